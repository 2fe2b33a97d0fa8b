"""DDIM, PLMS and classifier-free guidance against diffusers (DDIMScheduler, PNDMScheduler with
skip_prk_steps, and the whole StableDiffusionPipeline) on the same tiny UNet, plus the places where
diffusers and the CompVis original part ways.

What these tests establish (float32 on CPU):
- DDIMScheduler(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False) is CompVis DDIM, eta = 0
  and eta > 0 alike, whenever arange(0, 1000, 1000 // S) has exactly S entries (S = 50, 25, 10, 5, ...).
- PNDMScheduler(skip_prk_steps=True) is CompVis PLMS. Its timestep list repeats the second timestep
  ([981, 961, 961, 941, ...], S + 1 entries): the repeat is not an extra step but the second model call
  of the original's pseudo improved Euler warm-up (the original makes it inside its first step); both
  evaluate the model at the same (x, t) sequence. Its update is the PNDM paper's eq. (9), algebraically
  the DDIM eta = 0 update; the two agree to float32 rounding (< 2e-6 relative here).
- Where they differ: (1) the number of steps when 1000 // S does not fit S times snugly: the original's
  arange(0, 1000, 1000 // S) then has more entries and it runs them all (S = 6 -> 7, 7 -> 8, 15 -> 16,
  30 -> 31 steps); diffusers runs S. For S = 3, 9, 27, 36, 37, 101-111, ... the original's last timestep is
  1000 and it fails (index past alphas_cumprod); diffusers runs S steps. (2) diffusers computes the
  schedule in float32 (linspace, square, cumprod), the original in float64 then casts: alphas_cumprod
  differ by up to 1e-6 relative, which moved 10-step samples of the tiny UNet by ~4e-7 relative.
- The whole StableDiffusionPipeline (its own UNet2DConditionModel, AutoencoderKL, CLIPTextModel and
  tokenizer, loaded from the folder our adapter writes) gives the same latents and images as
  tools.sample for PLMS and DDIM with guidance: the uncond context CLIP(""), latent scaling and decode agree.
"""
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from conftest import reinit_zeroed_, rel_err
from models.configs import tiny
from models.guidance import ClassifierFreeGuidance
from models.samplers import (ddim_coefficients, ddim_sample, ddim_timesteps, initial_noise, plms_sample,
                             seeded_generators, step_noise)
from models.schedule import DDPMSchedule
from models.unet import UNetModel

CFG = tiny()
# SD v1's scheduler settings (PNDM has no clip_sample; DDIM needs it off).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
DDIM = dict(SCHEDULE, clip_sample=False)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return reinit_zeroed_(UNetModel(CFG.unet)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def abar():
    return DDPMSchedule(CFG.schedule).alphas_cumprod


class Recorder:
    """An epsilon predictor that remembers where it was called."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, cond):
        self.calls.append((int(t[0]), x.clone()))
        return self.fn(x, t, cond)


def _setup(unet, scale=3.0, batch=2, size=8):
    torch.manual_seed(1)
    cond = torch.randn(batch, 77, CFG.unet.context_dim)
    uncond = torch.randn(1, 77, CFG.unet.context_dim)
    x_t = initial_noise(list(range(batch)), (4, size, size))
    return ClassifierFreeGuidance(unet, uncond, scale), x_t, cond


def _with_our_schedule(scheduler, abar):
    """diffusers' own alphas_cumprod is computed in float32; give it the original's (float64, cast)."""
    scheduler.alphas_cumprod = abar.clone()
    scheduler.final_alpha_cumprod = abar[0].clone()
    return scheduler


def test_timesteps_are_the_originals_and_diffusers_leading_plus_one():
    assert ddim_timesteps(50).tolist() == list(range(1, 1000, 20))  # make_ddim_timesteps: arange(0, T, c) + 1
    for steps in (50, 25, 10, 1):
        s = DDIMScheduler(**DDIM)
        s.set_timesteps(steps)
        assert s.timesteps.flip(0).tolist() == ddim_timesteps(steps).tolist()
    # S = 30: c = 33 and arange(0, 1000, 33) has 31 entries; the original runs them all, diffusers 30.
    s = DDIMScheduler(**DDIM)
    s.set_timesteps(30)
    ours = ddim_timesteps(30)
    assert len(ours) == 31 and len(s.timesteps) == 30 and s.timesteps.flip(0).tolist() == ours[:30].tolist()
    quad = ddim_timesteps(10, discretization="quad")
    assert len(quad) == 10 and quad[0] == 1 and bool((quad.diff() > 0).all()) and int(quad[-1]) == 801
    with pytest.raises(ValueError, match="between 1 and"):
        ddim_timesteps(0)
    # S = 3: arange(0, 1000, 333) + 1 ends at 1000 = T, where the original indexes past alphas_cumprod;
    # diffusers (arange(S) * 333 + 1) runs 3 steps instead.
    with pytest.raises(ValueError, match="t=1000, past the 1000-step schedule"):
        ddim_timesteps(3)
    s.set_timesteps(3)
    assert s.timesteps.tolist() == [667, 334, 1]


def test_coefficients_follow_make_ddim_sampling_parameters(abar):
    ts = ddim_timesteps(50)
    c = ddim_coefficients(abar, ts, eta=0.5)
    assert torch.equal(c.alphas, abar[ts]) and c.alphas_prev[0] == abar[0] and torch.equal(c.alphas_prev[1:], abar[ts[:-1]])
    a, ap = abar[ts].double(), c.alphas_prev.double()
    expected = 0.5 * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    assert torch.allclose(c.sigmas.double(), expected, rtol=1e-6, atol=0)
    assert torch.equal(ddim_coefficients(abar, ts, eta=0.0).sigmas, torch.zeros(50))


def _run_diffusers_ddim(scheduler, denoiser, x_t, cond, steps, eta, **step_kwargs):
    """diffusers' loop: set_timesteps, then step() per timestep with the same per-sample noise streams."""
    gens = [torch.Generator().manual_seed(10 + i) for i in range(x_t.shape[0])]
    scheduler.set_timesteps(steps)
    x = x_t.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = denoiser(x, t.expand(x.shape[0]), cond)
            noise = step_noise(x, gens) if eta > 0 else None
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise, **step_kwargs).prev_sample
    return x


def _ours_ddim(denoiser, x_t, cond, steps, abar, eta, **kwargs):
    return ddim_sample(denoiser, x_t, ddim_timesteps(steps), cond, alphas_cumprod=abar, eta=eta,
                       generator=[torch.Generator().manual_seed(10 + i) for i in range(x_t.shape[0])], **kwargs)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_equals_diffusers_ddim_scheduler(unet, abar, eta):
    steps = 10
    denoiser, x_t, cond = _setup(unet)
    ours = _ours_ddim(denoiser, x_t, cond, steps, abar, eta)
    theirs = _with_our_schedule(DDIMScheduler(**DDIM), abar)
    assert rel_err(ours, _run_diffusers_ddim(theirs, denoiser, x_t, cond, steps, eta)) <= 2e-6
    # With diffusers' own float32 schedule (abar off by up to 1e-6 relative) samples move by < 1e-6 here.
    assert rel_err(ours, _run_diffusers_ddim(DDIMScheduler(**DDIM), denoiser, x_t, cond, steps, eta)) <= 5e-6


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_clip_x0_is_diffusers_clip_sample_with_the_clipped_model_output(unet, abar, eta):
    """clip_x0 = r: pred_x0 clamped to [-r, r] and eps re-derived from it, as diffusers' DDIMScheduler with
    clip_sample=True, clip_sample_range=r and step(use_clipped_model_output=True) (GLIDE's rule)."""
    steps, bound = 10, 0.5
    denoiser, x_t, cond = _setup(unet)
    seen = []
    ours = _ours_ddim(denoiser, x_t, cond, steps, abar, eta, clip_x0=bound,
                      callback=lambda i, t, x, x0: seen.append(x0.abs().max().item()))
    theirs = _with_our_schedule(DDIMScheduler(**{**DDIM, "clip_sample": True, "clip_sample_range": bound}), abar)
    assert rel_err(ours, _run_diffusers_ddim(theirs, denoiser, x_t, cond, steps, eta,
                                             use_clipped_model_output=True)) <= 2e-6
    # The clamp acted (the noise's pred_x0 at t = 901 is far outside +-0.5) and bounded every step's pred_x0.
    plain = _ours_ddim(denoiser, x_t, cond, steps, abar, eta)
    assert max(seen) <= bound and rel_err(ours, plain) > 0.1
    # A bound nothing reaches changes nothing but the rounding of the re-derived eps.
    assert rel_err(_ours_ddim(denoiser, x_t, cond, steps, abar, eta, clip_x0=1e9), plain) <= 1e-5


def test_plms_equals_diffusers_pndm_skip_prk(unet, abar):
    steps = 10
    denoiser, x_t, cond = _setup(unet)
    ours_model = Recorder(denoiser)
    ours = plms_sample(ours_model, x_t, ddim_timesteps(steps), cond, alphas_cumprod=abar)

    scheduler = _with_our_schedule(PNDMScheduler(**{**SCHEDULE, "skip_prk_steps": True}), abar)
    scheduler.set_timesteps(steps)
    theirs_model = Recorder(denoiser)
    x = x_t.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(theirs_model(x, t.expand(2), cond), t, x).prev_sample

    # diffusers lists the second timestep twice; the original calls the model there twice inside step 1.
    assert scheduler.timesteps.tolist()[:4] == [901, 801, 801, 701]
    assert [t for t, _ in ours_model.calls] == scheduler.timesteps.tolist()  # S + 1 = 11 calls at the same t's
    assert len(ours_model.calls) == steps + 1
    for (_, a), (_, b) in zip(ours_model.calls, theirs_model.calls):
        assert rel_err(a, b) <= 2e-6  # ... and at the same x's
    assert rel_err(ours, x) <= 2e-6

    # The step count differs where the original's arange yields more than S timesteps.
    uneven = Recorder(denoiser)
    plms_sample(uneven, x_t, ddim_timesteps(30), cond, alphas_cumprod=abar)
    scheduler.set_timesteps(30)
    assert len(uneven.calls) == 32 and len(scheduler.timesteps) == 31


def test_plms_clip_x0_bounds_every_update(unet, abar):
    """PLMS clamps the pred_x0 of each update (the multistep eps is combined first, from the model's raw eps)."""
    denoiser, x_t, cond = _setup(unet)
    ts = ddim_timesteps(6)
    seen = []
    clipped = plms_sample(denoiser, x_t, ts, cond, alphas_cumprod=abar, clip_x0=0.5,
                          callback=lambda i, t, x, x0: seen.append(x0.abs().max().item()))
    plain = plms_sample(denoiser, x_t, ts, cond, alphas_cumprod=abar)
    assert max(seen) <= 0.5 and rel_err(clipped, plain) > 0.1
    assert rel_err(plms_sample(denoiser, x_t, ts, cond, alphas_cumprod=abar, clip_x0=1e9), plain) <= 1e-5


def test_plms_refuses_eta_and_adams_bashforth_weights_sum_to_one(unet, abar):
    denoiser, x_t, cond = _setup(unet)
    with pytest.raises(ValueError, match="eta=0"):
        plms_sample(denoiser, x_t, ddim_timesteps(5), cond, alphas_cumprod=abar, eta=0.1)
    # A model with constant eps: every multistep combination returns that eps, so PLMS equals DDIM.
    const = torch.randn_like(x_t)
    model = lambda x, t, c: const  # noqa: E731
    ts = ddim_timesteps(8)
    assert rel_err(plms_sample(model, x_t, ts, cond, alphas_cumprod=abar),
                   ddim_sample(model, x_t, ts, cond, alphas_cumprod=abar)) <= 1e-6


def test_guidance_combines_one_batch_and_scale_one_is_the_plain_model(unet):
    denoiser, x_t, cond = _setup(unet, scale=4.0)
    t = torch.tensor([500, 500])
    e_u = unet(x_t, t, denoiser.uncond.expand(2, -1, -1))
    e_c = unet(x_t, t, cond)
    assert rel_err(denoiser(x_t, t, cond), e_u + 4.0 * (e_c - e_u)) <= 1e-5
    batches = []
    counting = lambda x, t, c: batches.append(x.shape[0]) or unet(x, t, c)  # noqa: E731
    ClassifierFreeGuidance(counting, denoiser.uncond, 1.0)(x_t, t, cond)
    ClassifierFreeGuidance(counting, denoiser.uncond, 7.5)(x_t, t, cond)
    assert batches == [2, 4]


def test_seeded_noise_does_not_depend_on_the_batch(unet, abar):
    denoiser, _, cond = _setup(unet, batch=3)
    gens3, gens1 = seeded_generators([5, 6, 7]), seeded_generators([6])
    x3, x1 = initial_noise(gens3, (4, 8, 8)), initial_noise(gens1, (4, 8, 8))
    assert torch.equal(x3[1:2], x1)
    ts = ddim_timesteps(4)
    both = ddim_sample(denoiser, x3, ts, cond, alphas_cumprod=abar, eta=1.0, generator=gens3)
    one = ddim_sample(denoiser, x1, ts, cond[1:2], alphas_cumprod=abar, eta=1.0, generator=gens1)
    assert rel_err(both[1:2], one) <= 1e-5


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """One random tiny model as an original checkpoint and as a diffusers pipeline folder."""
    from models.adapters.diffusers_folder import save_diffusers
    from models.stable_diffusion import build_models, save_ldm_checkpoint

    torch.manual_seed(0)
    m = build_models(CFG)
    reinit_zeroed_(m.unet)
    root = tmp_path_factory.mktemp("tiny")
    save_ldm_checkpoint(root / "tiny.ckpt", m)
    save_diffusers(root / "pipe", CFG, m.unet.state_dict(), m.vae.state_dict(), m.text_encoder.state_dict(),
                   sample_size=8)
    return root


@pytest.mark.parametrize("sampler", ["plms", "ddim"])
def test_txt2img_equals_diffusers_pipeline(tiny_files, sampler):
    from diffusers import StableDiffusionPipeline

    from tools.sample import SamplingConfig, decode, load_sampling_models, sample_latents, to_uint8

    prompts, seeds = ["a red bus", "two cats on a sofa"], [3, 4]
    cfg = SamplingConfig(sampler=sampler, steps=5, scale=5.0, height=64, width=64)  # PLMS: Euler, AB2, AB3, AB4 x2
    ours = load_sampling_models(tiny_files / "tiny.ckpt", arch="tiny")
    z = sample_latents(ours, prompts, seeds, cfg)
    images = decode(ours, z, cfg)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_files / "pipe", safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if sampler == "ddim":  # the folder ships the PNDM (PLMS) config SD v1 releases use
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    x_t = initial_noise(seeds, (4, 8, 8))
    final = {}

    def keep_latents(pipeline, i, t, tensors):
        final["z"] = tensors["latents"].clone()
        return tensors

    images_theirs = pipe(prompts, latents=x_t.clone(), output_type="pt", height=64, width=64, num_inference_steps=5,
                         guidance_scale=5.0, callback_on_step_end=keep_latents).images
    z_theirs = final["z"]
    assert rel_err(z, z_theirs) <= 5e-6
    assert (images - images_theirs).abs().max() <= 1e-5
    # txt2img truncates (astype(np.uint8)); diffusers' numpy output rounds.
    assert torch.equal(to_uint8(images), (255 * images).floor().permute(0, 2, 3, 1).to(torch.uint8))


def test_clip_x0_auto_clamps_pixel_latents_only_and_bad_values_say_what_to_change():
    import argparse

    from models.pixel_first_stage import PixelFirstStage
    from models.vae import AutoencoderKL
    from tools.sample import SamplingConfig, add_sampling_args, sampling_config

    pixels, vae = PixelFirstStage(scale_factor=0.5), AutoencoderKL(CFG.vae)
    assert SamplingConfig().clip_bound(pixels) == 0.5  # the pooled image's range, scaled
    assert SamplingConfig().clip_bound(vae) is None  # SD's latents have no range: the original never clamps
    assert SamplingConfig(clip_x0="none").clip_bound(pixels) is None
    assert SamplingConfig(clip_x0=3.0).clip_bound(vae) == 3.0
    for bad, says in (("always", "auto or none"), (0.0, "must be > 0"), (-1.0, "must be > 0")):
        with pytest.raises(ValueError, match=says):
            SamplingConfig(clip_x0=bad)

    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    assert sampling_config(parser.parse_args([])).clip_x0 == "auto"
    assert sampling_config(parser.parse_args(["--clip-x0", "none"])).clip_x0 == "none"
    assert sampling_config(parser.parse_args(["--clip-x0", "1.5"])).clip_x0 == 1.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--clip-x0", "sometimes"])


def test_a_trainer_export_names_its_architecture(tmp_path):
    import json

    from tools.sample import checkpoint_arch

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.ckpt").write_bytes(b"")
    (export / "export.json").write_text(json.dumps({"step": 3, "arch": "mini", "stage": "mini_v1-3"}))  # as train/export.py
    assert checkpoint_arch(export / "model.ckpt", None) == "mini"  # no --arch needed
    assert checkpoint_arch(export / "model.ckpt", "mini") == "mini"
    with pytest.raises(ValueError, match="arch 'mini'.*not 'tiny'.*--arch mini"):
        checkpoint_arch(export / "model.ckpt", "tiny")
    assert checkpoint_arch(tmp_path / "sd-v1-3.ckpt", None) == "sd-v1"  # a released file
    assert checkpoint_arch(tmp_path / "sd-v1-3.ckpt", "tiny") == "tiny"


def test_the_device_asked_for_is_checked_before_any_weights_are_read(monkeypatch, tmp_path, capsys):
    from models.device import usable_device
    from tools import sample

    assert usable_device("cpu") == torch.device("cpu")
    for text, message in (("gpu", "give cpu, cuda or cuda:N"), ("mps", "runs on cpu or cuda")):
        with pytest.raises(ValueError, match=message):
            usable_device(text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is visible here; use --device cpu"):
        usable_device("cuda")
    # It used to be torch's "Found no NVIDIA driver" traceback from the first .to(), after loading the file.
    with pytest.raises(SystemExit):
        sample.main([str(tmp_path / "absent.ckpt"), "--prompt", "x", "--device", "cuda"])
    assert "no CUDA device is visible" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert usable_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"sees 2 GPU\(s\), cuda:0 to cuda:1"):
        usable_device("cuda:2")
