"""The SD stages from v1-1_512 on train on precomputed latents (conf/stage): the trainer's loss on latent
shards must be its loss on the image shards they were made from. Same centre crop, same posterior, the
same noise drawn from it; only the float16 storage of the posterior's mean and std differs. And the
settings that cannot work with latents (random crops, image shards, another resolution) say so.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from data.loader import LoaderConfig, ShardLoader
from data.precompute import PrecomputeConfig, load_models, precompute_shards
from data.samples import WrongShardKind
from data.synth import write_synthetic_shards
from train.config import ConfigError, validate
from train.flops import text_encode_flops_per_caption, vae_encode_flops_per_image
from train.step import encode_batch, training_loss
from train_helpers import compose_train_config, in_process_trainer

RESOLUTION = 64  # the mini_test stage's


def _perturbed(trainer):
    """The same random perturbation of every UNet weight: CompVis' zero-initialised output layer would
    make the UNet predict 0 whatever its input, and the loss blind to the latents."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.engine.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return trainer


def _loss(trainer, batch) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)  # the same posterior noise, timesteps and ε for both
    with torch.no_grad():
        return training_loss(batch, trainer.engine.module, trainer.frozen, trainer.schedule, trainer.env.device,
                             generator, contextlib.nullcontext(), contextlib.nullcontext())


def test_a_step_on_precomputed_latents_is_the_step_on_their_images(tmp_path):
    images = tmp_path / "images"
    write_synthetic_shards(images, num_shards=1, samples_per_shard=8, image_size=RESOLUTION, seed=0)
    settings = ("backend=ddp", "parallel.precision=fp32", "stage.micro_batch=4")
    on_images = in_process_trainer(tmp_path / "a", f"{images}/00000.tar", *settings)
    precompute_shards(images, tmp_path / "latents", on_images.frozen.vae,
                      config=PrecomputeConfig(resolution=RESOLUTION, text=False, decode_workers=1), progress=False)
    on_latents = in_process_trainer(tmp_path / "b", f"{tmp_path}/latents/00000.tar", *settings,
                                    "stage.data.latents=true")
    for a, b in zip(on_images.engine.unet.state_dict().values(), on_latents.engine.unet.state_dict().values()):
        assert torch.equal(a, b)  # both runs start from the seed's weights
    _perturbed(on_images), _perturbed(on_latents)
    # What the W&B throughput counts beside the UNet: the encoders each run has in its loop.
    sd = on_images.sd_cfg
    vae, text = vae_encode_flops_per_image(sd.vae, RESOLUTION), text_encode_flops_per_caption(sd.text)
    assert vae > 0 and text > 0
    assert (on_images.encoder_flops_per_image, on_latents.encoder_flops_per_image) == (vae + text, text)

    image_batch, latent_batch = next(iter(on_images.loader)), next(iter(on_latents.loader))
    assert latent_batch["keys"] == image_batch["keys"]  # the same samples, in the same order
    # What the UNet is fed: z (a posterior sample, scaled) and the caption's context.
    def encode(batch, trainer, seed=0):
        return encode_batch(batch, trainer.frozen, trainer.env.device, torch.Generator().manual_seed(seed),
                            contextlib.nullcontext())

    (z, context), (latent_z, latent_context) = encode(image_batch, on_images), encode(latent_batch, on_latents)
    assert torch.equal(latent_context, context)
    tolerance = 2e-3 * z.abs().max().item()  # float16 storage of the posterior
    torch.testing.assert_close(latent_z, z, rtol=0, atol=tolerance)
    # ... which another draw of the posterior noise is far outside: the same sample, not just the same mean.
    assert (encode(latent_batch, on_latents, seed=1)[0] - z).abs().max() > 10 * tolerance
    assert _loss(on_latents, latent_batch).item() == pytest.approx(_loss(on_images, image_batch).item(), rel=1e-4)


def test_bf16_latents_are_what_a_bf16_run_encodes_in_its_loop(tmp_path):
    """A bf16 stage's latents are made under bf16 autocast (launch/precompute.py passes --dtype bfloat16),
    as its loop encodes images: the stored posterior is the loop's, exactly (a bf16 number is a float16
    one, but for float16's subnormals below 6e-5); float32 latents are not."""
    images = tmp_path / "images"
    write_synthetic_shards(images, num_shards=1, samples_per_shard=4, image_size=RESOLUTION, seed=2)
    settings = ("backend=ddp", "parallel.precision=bf16", "stage.micro_batch=4")
    on_images = in_process_trainer(tmp_path / "a", f"{images}/00000.tar", *settings)
    pixels = next(iter(on_images.loader))["pixels"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's encode_autocast at bf16
        in_loop = on_images.frozen.vae.encode(pixels)
    for dtype in ("bfloat16", "float32"):
        precompute_shards(images, tmp_path / dtype, on_images.frozen.vae, progress=False, config=PrecomputeConfig(
            resolution=RESOLUTION, text=False, decode_workers=1, batch_size=4, dtype=dtype))
        on_latents = in_process_trainer(tmp_path / f"b-{dtype}", f"{tmp_path}/{dtype}/00000.tar", *settings,
                                        "stage.data.latents=true")
        stored = next(iter(on_latents.loader))
        mean_error = (stored["latent_mean"].float() - in_loop.mean.float()).abs().max().item()
        std_error = (stored["latent_std"].float() - in_loop.std.float()).abs().max().item()
        if dtype == "bfloat16":
            assert max(mean_error, std_error) <= 2 ** -25, (mean_error, std_error)  # float16 subnormal rounding
        else:
            assert mean_error > 1e-3, mean_error


def test_latents_with_random_crops_are_refused_at_start_up():
    cfg = compose_train_config("stage.data.shards=x.tar", "stage.data.latents=true", "stage.data.crop=random")
    with pytest.raises(ConfigError, match="stage.data.* sets loader.crop='random' with latents=True.*centre crop"):
        validate(cfg, 1)
    cfg.stage.data.subset = "laion-5+"
    cfg.stage.data.crop = "center"
    with pytest.raises(ConfigError, match="unknown stage 'laion-5\\+'; choose one of laion2b-en"):
        validate(cfg, 1)


def test_the_wrong_kind_of_shard_says_what_to_set(tmp_path):
    """Image shards behind stage.data.latents=true, latent shards behind false, or latents of another
    resolution: the loader stops with the setting to change instead of a list of skip counts."""
    images = tmp_path / "images"
    write_synthetic_shards(images, num_shards=1, samples_per_shard=4, image_size=RESOLUTION, seed=0)
    vae, _ = load_models(None, arch="tiny")
    precompute_shards(images, tmp_path / "latents", vae,
                      config=PrecomputeConfig(resolution=RESOLUTION, text=False, decode_workers=1), progress=False)

    def first_batch(shards, **settings):
        config = LoaderConfig(**{"shards": shards, "resolution": RESOLUTION, "batch_size": 2, "num_workers": 0,
                                 **settings})
        return next(iter(ShardLoader(config, rank=0, world_size=1)))

    # The wrong kind of shard stops the loader at the first one (not after reading every shard).
    with pytest.raises(WrongShardKind, match="00000.tar: its samples hold images, not .latent.npy latents: point "
                                             "stage.data.shards at latent shards .python -m data precompute."):
        first_batch(f"{images}/00000.tar", latents=True)
    with pytest.raises(WrongShardKind, match="hold .latent.npy latents, not images: set stage.data.latents=true"):
        first_batch(f"{tmp_path}/latents/00000.tar")
    with pytest.raises(WrongShardKind, match="its latents are 8x8 .64 px., this stage trains at 128 px .16x16.: "
                                             "precompute its images at --resolution 128"):
        first_batch(f"{tmp_path}/latents/00000.tar", latents=True, resolution=128)


def test_precompute_then_train_on_the_latents_end_to_end(tmp_path):
    """What the 512 px stages run: `python -m data precompute --no-text` over image shards, then the
    trainer (2 processes, FSDP2, every default of the mini stage) on the latent shards, to the export."""
    from data.__main__ import main as data_main
    from train_helpers import run_train, status

    write_synthetic_shards(tmp_path / "images", num_shards=2, samples_per_shard=8, image_size=RESOLUTION, seed=1)
    assert data_main(["precompute", str(tmp_path / "images"), "--out", str(tmp_path / "latents"), "--random",
                      "--arch", "tiny", "--resolution", str(RESOLUTION), "--no-text", "--decode-workers", "1",
                      "--no-progress"]) == 0
    run_dir = tmp_path / "run"
    run_train(tmp_path, [f"stage.data.shards='{tmp_path}/latents/{{00000..00001}}.tar'", "stage.data.latents=true",
                         f"run.dir={run_dir}", "parallel.precision=fp32"])
    done = status(run_dir)
    assert done["state"] == "finished" and done["step"] == 6 and (run_dir / "export" / "model.ckpt").is_file()
