"""The VAE: SD v1 checkpoint layout, numerical parity with diffusers' AutoencoderKL, strict conversion."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from models.adapters.diffusers_vae import config_from_diffusers, diffusers_config, from_diffusers, to_diffusers
from models.adapters.keys import KeyMismatchError, load_strict
from models.configs import VAEConfig, tiny
from models.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
# Touch the lazily imported class now (~2 s) so that cost lands in collection, not in the first test.
diffusers.AutoencoderKL

REFERENCE = Path(__file__).parent / "assets" / "sd_v1_state_dict.json"
TINY = tiny().vae  # VAEConfig(ch=32, ch_mult=(1, 2, 2, 2))
TWO_LEVEL = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    # On CPU fp32 the outputs are in fact bitwise equal (same op sequence); the tolerance leaves room
    # for other kernels/platforms.
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def diffusers_pair(cfg: VAEConfig, seed: int = 0):
    """A randomly initialised diffusers VAE and ours loaded from it through from_diffusers."""
    torch.manual_seed(seed)
    theirs = diffusers.AutoencoderKL(**diffusers_config(cfg)).eval()
    with torch.no_grad():  # GroupNorms start at (1, 0): randomise them so a swapped norm cannot hide
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    ours = AutoencoderKL(cfg).eval()
    load_strict(ours, from_diffusers(theirs.state_dict(), cfg), "VAE from diffusers")
    return ours, theirs


def test_full_config_matches_sd_v1_checkpoint_layout():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    reference = json.loads(REFERENCE.read_text())["groups"]["vae"]
    ours = {f"first_stage_model.{k}": list(v.shape) for k, v in vae.state_dict().items()}
    assert ours == reference
    assert list(ours) == list(reference)  # module registration order is ldm's too


@pytest.mark.parametrize("cfg", [TINY, TWO_LEVEL], ids=["tiny-4-level", "2-level"])
@torch.no_grad()
def test_parity_with_diffusers(cfg):
    ours, theirs = diffusers_pair(cfg)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    post, dist = ours.encode(x), theirs.encode(x).latent_dist
    assert rel_err(post.mean, dist.mean) <= 1e-5
    assert rel_err(post.logvar, dist.logvar) <= 1e-5
    z = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(2))
    assert rel_err(ours.decode(z), theirs.decode(z).sample) <= 1e-5
    recon, _ = ours(x, sample_posterior=False)
    assert rel_err(recon, theirs(x, sample_posterior=False).sample) <= 1e-5


@torch.no_grad()
def test_parity_with_diffusers_full_width():
    # The real SD v1 widths (512-channel mid attention) at a small image, to stay ~2 s on a 2-core CPU.
    ours, theirs = diffusers_pair(VAEConfig())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    post, dist = ours.encode(x), theirs.encode(x).latent_dist
    assert rel_err(post.mean, dist.mean) <= 1e-5
    assert rel_err(post.logvar, dist.logvar) <= 1e-5
    assert rel_err(ours.decode(post.mean), theirs.decode(dist.mean).sample) <= 1e-5


def test_round_trip_is_bitwise():
    torch.manual_seed(0)
    sd = AutoencoderKL(TINY).state_dict()
    theirs = to_diffusers(sd, TINY)
    # Loads strictly into diffusers' own module, so key names and shapes are diffusers'.
    diffusers.AutoencoderKL(**diffusers_config(TINY)).load_state_dict(theirs, strict=True)
    back = from_diffusers(theirs, TINY)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k


def test_missing_and_unexpected_keys_are_named():
    theirs = to_diffusers(AutoencoderKL(TINY).state_dict(), TINY)
    theirs.pop("decoder.up_blocks.1.resnets.2.conv1.bias")
    theirs["encoder.mid_block.attentions.0.query.weight"] = torch.zeros(64, 64)  # legacy diffusers name
    with pytest.raises(KeyMismatchError) as err:
        from_diffusers(theirs, TINY)
    assert "decoder.up_blocks.1.resnets.2.conv1.bias" in str(err.value)
    assert "encoder.mid_block.attentions.0.query.weight" in str(err.value)

    ours = AutoencoderKL(TINY).state_dict()
    ours.pop("encoder.mid.attn_1.q.weight")
    ours["loss.logvar"] = torch.zeros(())
    with pytest.raises(KeyMismatchError) as err:
        to_diffusers(ours, TINY)
    assert "encoder.mid.attn_1.q.weight" in str(err.value) and "loss.logvar" in str(err.value)


def test_shape_mismatch_is_named():
    theirs = to_diffusers(AutoencoderKL(TINY).state_dict(), TINY)
    theirs["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(KeyMismatchError, match="quant_conv.weight"):
        from_diffusers(theirs, TINY)


@torch.no_grad()
def test_encode_latents_scaling_and_seeding():
    assert VAEConfig().scale_factor == 0.18215
    torch.manual_seed(0)
    vae = AutoencoderKL(TWO_LEVEL).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    a, b = vae.encode_latents(x, seeded(7)), vae.encode_latents(x, seeded(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, vae.encode_latents(x, seeded(8)))
    assert torch.equal(a, 0.18215 * vae.encode(x).sample(seeded(7)))
    assert torch.equal(vae.encode_latents(x, sample=False), 0.18215 * vae.encode(x).mean)
    assert a.shape == (2, TWO_LEVEL.embed_dim, 16, 16)
    assert torch.allclose(vae.decode_latents(a), vae.decode(a / 0.18215))


def test_posterior():
    from models.vae import DiagonalGaussianDistribution

    params = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), -100.0)], dim=1)
    post = DiagonalGaussianDistribution(params)
    assert post.logvar.min().item() == -30.0  # clamped
    assert torch.equal(post.mode(), post.mean)
    standard = DiagonalGaussianDistribution(torch.zeros(3, 8, 2, 2))
    assert torch.equal(standard.kl(), torch.zeros(3))
    assert torch.allclose(standard.kl(standard), torch.zeros(3))


def test_config_round_trip():
    for cfg in (VAEConfig(), TINY, TWO_LEVEL):
        assert config_from_diffusers(diffusers_config(cfg)) == cfg
    # A real diffusers config (with _class_name etc. and every default written out) reads back too.
    model_config = dict(diffusers.AutoencoderKL(**diffusers_config(TWO_LEVEL)).config)
    assert config_from_diffusers(model_config) == TWO_LEVEL
    assert config_from_diffusers(model_config, attention_backend="math").attention_backend == "math"
    with pytest.raises(ValueError, match="embed_dim"):
        diffusers_config(dataclasses.replace(TINY, embed_dim=8))
    with pytest.raises(ValueError, match="shift_factor"):
        config_from_diffusers({**model_config, "shift_factor": 0.1})
