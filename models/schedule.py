"""The DDPM noise schedule of SD v1 (CompVis `DDPM.register_schedule`): 1000 steps, "linear" betas
(linspace of square roots, then squared), and the 12 buffers the original checkpoint stores."""
from __future__ import annotations

import torch
from torch import nn

from .configs import ScheduleConfig

# The order the original registers them in, which is the order in its state dict.
BUFFER_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    # SD v1's "linear" is diffusers' "scaled_linear": both names mean linspace(sqrt)^2.
    return torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=torch.float64) ** 2


def schedule_buffers(cfg: ScheduleConfig) -> dict[str, torch.Tensor]:
    """All buffers computed in float64 and stored as float32, as the original does (numpy, then to_torch)."""
    betas = make_betas(cfg)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # v_posterior = 0
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {name: out[name].float() for name in BUFFER_NAMES}


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


class DDPMSchedule(nn.Module):
    """Holds the schedule buffers (state-dict keys equal the original's top-level keys) and q_sample."""

    def __init__(self, cfg: ScheduleConfig | None = None):
        super().__init__()
        self.cfg = cfg or ScheduleConfig()
        for name, value in schedule_buffers(self.cfg).items():
            self.register_buffer(name, value)

    @property
    def num_timesteps(self) -> int:
        return self.cfg.timesteps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, in the dtype of x0."""
        a = _gather(self.sqrt_alphas_cumprod, t, x0.ndim).to(x0.dtype)
        s = _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim).to(x0.dtype)
        return a * x0 + s * noise.to(x0.dtype)
