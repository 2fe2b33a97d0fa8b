"""DDIM and PLMS, computed as CompVis `ldm/models/diffusion/ddim.py` and `plms.py` compute them.

Samplers are plain functions of (model, x, timesteps, cond): `model(x, t, cond) -> eps` is any
epsilon predictor (a bare UNet, or `models.guidance.ClassifierFreeGuidance` around one), `x` is the
initial noise x_T, `timesteps` comes from `ddim_timesteps`, and `alphas_cumprod` is the DDPM schedule
buffer (float32, as the original reads `model.alphas_cumprod`).

What the original does and this file keeps (see tests/test_samplers.py for diffusers' side):
- Timesteps: c = T // S, steps = arange(0, T, c) + 1. The "+1" makes the last step land on t=1 and step
  to alphas_cumprod[0]. When T % S leaves room for more, arange yields more than S steps (S=30 gives 31):
  the original's assert is commented out, so it runs them; so do we. When the shifted last timestep
  lands on T (S = 3, 9, 27, 36, 37, ...) the original fails indexing abar[T]; we refuse such S up front.
- Coefficients: a = abar[steps], a_prev = [abar[0]] + abar[steps[:-1]], sigma = eta *
  sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) computed in float64 from the float32 abar, then used
  as float32 (`torch.full` in the original), and sqrt(1 - a) computed in float32.
- Update: pred_x0 = (x - sqrt(1 - a) eps) / sqrt(a); x_prev = sqrt(a_prev) pred_x0 +
  sqrt(1 - a_prev - sigma^2) eps + sigma * noise.
- clip_x0 (off by default, as in the original's latent samplers): pred_x0 clamped to [-r, r] and eps
  re-derived from the clamped pred_x0 before the update, as GLIDE and diffusers' DDIMScheduler with
  clip_sample=True, use_clipped_model_output=True do. For a first stage whose latents are pixels with a
  known range (models/pixel_first_stage.py), this is what pixel-space diffusion samples with (CompVis'
  DDPM `clip_denoised`). Keeping the model's eps beside a clamped pred_x0 (diffusers' default) steps toward
  two different images at once; on one draw of the miniature its check fell to 32% (69% unclamped, 79%
  with eps re-derived).
- PLMS: eta must be 0. Step 1 is a pseudo improved Euler step (a second model call at the next
  timestep, eps' = (e_t + e_next) / 2), then Adams-Bashforth of order 2, 3, 4 on the stored e_t's
  (never the combined eps'). S steps cost S + 1 model calls.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# (x [B,C,H,W], t [B] long, cond) -> eps [B,C,H,W]
Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
# Called after every step with (step number i, timestep, x_prev, pred_x0); may be None.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None] | None
Generators = torch.Generator | Sequence[torch.Generator] | None

DISCRETIZATIONS = ("uniform", "quad")


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, discretization: str = "uniform") -> torch.Tensor:
    """CompVis `make_ddim_timesteps`, ascending, as a LongTensor (the samplers walk it backwards)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps={num_steps}: choose between 1 and the {num_train_timesteps} training timesteps")
    if discretization == "uniform":
        steps = torch.arange(0, num_train_timesteps, num_train_timesteps // num_steps, dtype=torch.long)
    elif discretization == "quad":
        # numpy itself, so the truncation by astype(int) falls exactly where the original's does.
        grid = np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2
        steps = torch.from_numpy(grid.astype(np.int64))
    else:
        raise ValueError(f"discretization={discretization!r}: choose one of {', '.join(DISCRETIZATIONS)}")
    steps = steps + 1
    if int(steps[-1]) >= num_train_timesteps:
        # When T - 1 is a multiple of T // S (S = 3, 9, 27, 36, 37, 101-111, 251-333, 501-1000 for T = 1000) the
        # shift lands on t = T; the original then fails indexing alphas_cumprod[T]. We refuse it up front.
        raise ValueError(f"steps={num_steps}: the original's timesteps for it end at t={int(steps[-1])}, past the "
                         f"{num_train_timesteps}-step schedule (CompVis fails there too); choose another number of steps")
    return steps


@dataclass(frozen=True)
class DDIMCoefficients:
    """Per-step constants, indexed like `timesteps` (index 0 = the last step taken, t = 1)."""

    timesteps: torch.Tensor  # long [S], ascending
    alphas: torch.Tensor  # float32 [S]: abar_t
    alphas_prev: torch.Tensor  # float32 [S]: abar of the timestep the step lands on (abar[0] for index 0)
    sigmas: torch.Tensor  # float32 [S]
    sqrt_one_minus_alphas: torch.Tensor  # float32 [S]


def ddim_coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, eta: float = 0.0) -> DDIMCoefficients:
    """CompVis `make_ddim_sampling_parameters` (float32 abar in, float64 sigma, float32 out)."""
    if int(timesteps.max()) >= alphas_cumprod.numel():
        raise ValueError(f"timestep {int(timesteps.max())} is past the schedule's {alphas_cumprod.numel()} steps")
    abar = alphas_cumprod.detach().cpu().float()
    ts = timesteps.detach().cpu().long()
    alphas = abar[ts]
    alphas_prev = torch.cat([abar[:1], abar[ts[:-1]]])
    a, a_prev = alphas.double(), alphas_prev.double()
    sigmas = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    return DDIMCoefficients(ts, alphas, alphas_prev, sigmas.float(), (1.0 - alphas).sqrt())


def step_noise(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like `like`. A list of generators gives each sample its own stream
    (drawn on the generator's device, then moved), so an image does not depend on its batch-mates."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)
    if len(generator) != like.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
    return torch.cat([torch.randn((1, *like.shape[1:]), generator=g, device=g.device, dtype=torch.float32)
                      for g in generator]).to(like.device)


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: the same seed gives the same noise on any device and in any batch."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(seeds: Sequence[int | torch.Generator], shape: Sequence[int],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T [len(seeds), *shape], one image per seed (or per generator, which is advanced: pass the same
    generators on to a DDIM sampler with eta > 0 and its step noise continues each image's stream)."""
    gens = [s if isinstance(s, torch.Generator) else seeded_generators([s])[0] for s in seeds]
    return torch.cat([torch.randn((1, *shape), generator=g, device=g.device, dtype=torch.float32)
                      for g in gens]).to(device)


def ddim_update(x: torch.Tensor, eps: torch.Tensor, coeffs: DDIMCoefficients, index: int,
                noise: torch.Tensor | None = None, clip_x0: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from timesteps[index] to the one below it: (x_prev, pred_x0). x and eps float32.

    `clip_x0` = r: pred_x0 clamped to [-r, r] and eps re-derived from it (see the module docstring)."""
    def at(values: torch.Tensor) -> torch.Tensor:
        return values[index].to(device=x.device, dtype=torch.float32)

    a_t, a_prev, sigma_t, sqrt_one_minus_at = (at(coeffs.alphas), at(coeffs.alphas_prev), at(coeffs.sigmas),
                                               at(coeffs.sqrt_one_minus_alphas))
    pred_x0 = (x - sqrt_one_minus_at * eps) / a_t.sqrt()
    if clip_x0 is not None:
        pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
        eps = (x - a_t.sqrt() * pred_x0) / sqrt_one_minus_at
    dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


def _eps(model: Denoiser, x: torch.Tensor, t: int, cond: Any) -> torch.Tensor:
    ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    return model(x, ts, cond).float()


@torch.no_grad()
def ddim_sample(model: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, cond: Any, *,
                alphas_cumprod: torch.Tensor, eta: float = 0.0, generator: Generators = None,
                callback: StepCallback = None, clip_x0: float | None = None) -> torch.Tensor:
    """CompVis `DDIMSampler.ddim_sampling` from x = x_T; returns the final x (latents at t = 0).

    With eta > 0 each step adds sigma * noise drawn from `generator` (one per sample, or one for the batch;
    the original draws from the global RNG)."""
    coeffs = ddim_coefficients(alphas_cumprod, timesteps, eta)
    x = x.float()
    total = len(coeffs.timesteps)
    for i, t in enumerate(coeffs.timesteps.flip(0).tolist()):
        index = total - i - 1
        eps = _eps(model, x, t, cond)
        noise = step_noise(x, generator) if eta > 0 else None
        x, pred_x0 = ddim_update(x, eps, coeffs, index, noise, clip_x0)
        if callback is not None:
            callback(i, t, x, pred_x0)
    return x


@torch.no_grad()
def plms_sample(model: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, cond: Any, *,
                alphas_cumprod: torch.Tensor, eta: float = 0.0, generator: Generators = None,
                callback: StepCallback = None, clip_x0: float | None = None) -> torch.Tensor:
    """CompVis `PLMSSampler.plms_sampling` from x = x_T; returns the final x (latents at t = 0).

    `eta` and `generator` are accepted so both samplers share a signature; PLMS is deterministic and, like
    the original, refuses eta != 0."""
    if eta != 0:
        raise ValueError(f"eta={eta}: PLMS is deterministic and needs eta=0 (use the DDIM sampler for eta > 0)")
    coeffs = ddim_coefficients(alphas_cumprod, timesteps, 0.0)
    x = x.float()
    time_range = coeffs.timesteps.flip(0).tolist()
    total = len(time_range)
    old_eps: list[torch.Tensor] = []
    for i, t in enumerate(time_range):
        index = total - i - 1
        t_next = time_range[min(i + 1, total - 1)]
        e_t = _eps(model, x, t, cond)
        if len(old_eps) == 0:
            # Pseudo improved Euler (2nd order): a trial DDIM step, the model again where it lands, the mean.
            x_trial, _ = ddim_update(x, e_t, coeffs, index, clip_x0=clip_x0)
            e_t_next = _eps(model, x_trial, t_next, cond)
            e_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = ddim_update(x, e_prime, coeffs, index, clip_x0=clip_x0)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        if callback is not None:
            callback(i, t, x, pred_x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim_sample, "plms": plms_sample}
