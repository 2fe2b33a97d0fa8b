"""The frozen parts from where SD v1 took them (models/pretrained_parts.py): the LDM autoencoder's own
checkpoint, a diffusers VAE folder, and the text tower of a whole transformers CLIPModel folder, checked
against the libraries that wrote them, then through a training run and the precompute command."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from data.synth import write_synthetic_shards
from models.adapters.diffusers_vae import diffusers_config
from models.adapters.keys import KeyMismatchError, load_strict
from models.configs import tiny
from models.pretrained_parts import text_encoder_state_dict, vae_state_dict
from models.text_encoder import FrozenCLIPTextEncoder
from models.vae import AutoencoderKL
from train_helpers import run_train

CFG = tiny()


def _clip_folder(folder, hidden_act: str = "quick_gelu"):
    """A whole CLIPModel as openai/clip-vit-large-patch14 is published (image tower, projections, and the
    token ids 0/1/2 its config names), at the tiny text tower's size."""
    text = CFG.text
    config = CLIPConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                         num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                         max_position_embeddings=text.max_position_embeddings, hidden_act=hidden_act,
                         bos_token_id=0, pad_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=16)
    torch.manual_seed(1)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    return model


def _kl_f8_checkpoint(path):
    """The LDM autoencoder's own file: a Lightning checkpoint whose state dict holds the VAE and the loss
    it was trained with (LPIPS, discriminator)."""
    torch.manual_seed(2)
    vae = AutoencoderKL(CFG.vae)
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sd = dict(vae.state_dict())
    sd |= {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
           "loss.perceptual_loss.net.slice1.0.weight": torch.randn(8, 3, 3, 3)}
    torch.save({"state_dict": sd, "global_step": 246_803}, path)
    return vae.state_dict()


def test_the_text_tower_of_a_whole_clip_model_is_what_frozen_clip_embedder_took(tmp_path):
    clip = _clip_folder(tmp_path / "clip")
    ours = FrozenCLIPTextEncoder(CFG.text)
    load_strict(ours, text_encoder_state_dict(tmp_path / "clip", CFG.text), "text encoder")
    ids = torch.randint(0, CFG.text.vocab_size, (2, CFG.text.max_position_embeddings))
    with torch.no_grad():
        assert torch.equal(ours(ids), clip.text_model(input_ids=ids).last_hidden_state)


def test_loading_a_clip_folder_first_leaves_meta_builds_working(tmp_path):
    """In a fresh process whose first device context is transformers' own (it swaps torch.linspace while
    building on meta, and torch caches the functions a device context redirects on first use), the models
    must still build on the meta device afterwards (the layout checks do that)."""
    import subprocess
    import sys

    from train_helpers import REPO

    _clip_folder(tmp_path / "clip")
    script = ("from models.configs import tiny\nfrom models.pretrained_parts import text_encoder_state_dict\n"
              "from models.stable_diffusion import build_models\n"
              f"text_encoder_state_dict({str(tmp_path / 'clip')!r}, tiny().text)\n"
              "print(build_models(tiny(), 'meta').schedule.betas.device)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "meta", out.stderr[-3000:]


def test_a_text_encoder_of_another_function_is_refused_by_name(tmp_path):
    _clip_folder(tmp_path / "clip", hidden_act="gelu")  # same shapes, another activation
    with pytest.raises(KeyMismatchError, match=r"hidden_act='gelu' \(the model has 'quick_gelu'\)"):
        text_encoder_state_dict(tmp_path / "clip", CFG.text)


def test_the_autoencoder_checkpoint_loads_without_its_training_loss(tmp_path):
    expected = _kl_f8_checkpoint(tmp_path / "model.ckpt")
    got = vae_state_dict(tmp_path / "model.ckpt", CFG.vae)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_diffusers_vae_folder_encodes_as_diffusers_does(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(3)
    theirs = diffusers.AutoencoderKL(**diffusers_config(CFG.vae)).eval()
    theirs.save_pretrained(tmp_path / "pipeline" / "vae")  # the pipeline folder is accepted for its vae/
    ours = AutoencoderKL(CFG.vae).eval()
    load_strict(ours, vae_state_dict(tmp_path / "pipeline", CFG.vae), "VAE")
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours.encode(x).mean, theirs.encode(x).latent_dist.mean, atol=1e-5)
    other = diffusers.AutoencoderKL(**(diffusers_config(CFG.vae) | {"scaling_factor": 0.13025}))
    other.save_pretrained(tmp_path / "sdxl-vae")
    with pytest.raises(KeyMismatchError, match=r"scale_factor=0.13025 \(the model has 0.18215\)"):
        vae_state_dict(tmp_path / "sdxl-vae", CFG.vae)


def test_a_stage_trains_on_the_published_parts_and_exports_them(tmp_path):
    """`model.pretrained_vae` + `model.pretrained_text_encoder` through `python -m train`: the export's
    first_stage_model.* and cond_stage_model.* are the published weights."""
    vae = _kl_f8_checkpoint(tmp_path / "model.ckpt")
    clip = _clip_folder(tmp_path / "clip")
    write_synthetic_shards(tmp_path / "shards", num_shards=1, samples_per_shard=8, image_size=64, seed=0)
    run_dir = tmp_path / "run"
    run_train(tmp_path, [f"stage.data.shards={tmp_path}/shards/00000.tar", f"run.dir={run_dir}", "backend=ddp",
                         "stage.steps=1", "stage.data.num_workers=0", f"model.pretrained_vae={tmp_path}/model.ckpt",
                         f"model.pretrained_text_encoder={tmp_path}/clip"], nproc=1)
    sd = torch.load(run_dir / "export" / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(sd[f"first_stage_model.{k}"], v) for k, v in vae.items())
    text = {k: v for k, v in clip.text_model.state_dict().items()}
    assert all(torch.equal(sd[f"cond_stage_model.transformer.text_model.{k}"], v) for k, v in text.items())


def test_precompute_encodes_with_the_autoencoder_checkpoint(tmp_path):
    """`python -m data precompute --vae kl-f8/model.ckpt`: the stored posteriors are that VAE's."""
    from collections import Counter

    from data.__main__ import main as data_main
    from data.latent_format import decode_latent
    from data.shard_io import iter_shard_samples
    from data.transforms import decode_resize_crop, to_pixels

    vae = AutoencoderKL(CFG.vae).eval()
    vae.load_state_dict(_kl_f8_checkpoint(tmp_path / "model.ckpt"))
    write_synthetic_shards(tmp_path / "images", num_shards=1, samples_per_shard=2, image_size=64, seed=4)
    common = [str(tmp_path / "images" / "00000.tar"), "--out", str(tmp_path / "latents"), "--arch", "tiny",
              "--resolution", "64", "--decode-workers", "1", "--no-progress"]
    with pytest.raises(SystemExit, match="the caption contexts need the text encoder: add --text-encoder DIR"):
        data_main(["precompute", *common, "--vae", str(tmp_path / "model.ckpt")])
    with pytest.raises(SystemExit, match="give one of --checkpoint PATH .*; not --vae and --random"):
        data_main(["precompute", *common, "--vae", str(tmp_path / "model.ckpt"), "--random", "--no-text"])
    assert data_main(["precompute", *common, "--vae", str(tmp_path / "model.ckpt"), "--no-text"]) == 0
    images = {key: s for _, key, s in iter_shard_samples(str(tmp_path / "images" / "00000.tar"), Counter())}
    stored = {key: s for _, key, s in iter_shard_samples(str(tmp_path / "latents" / "00000.tar"), Counter())}
    assert stored.keys() == images.keys()
    for key, sample in stored.items():
        with torch.no_grad():
            posterior = vae.encode(to_pixels([decode_resize_crop(images[key]["jpg"], 64, crop="center")]))
        mean, _ = decode_latent(sample["latent.npy"], 8)
        assert torch.allclose(torch.from_numpy(mean).float(), posterior.mean[0], rtol=2e-3, atol=2e-3)
