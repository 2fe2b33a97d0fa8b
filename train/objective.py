"""The SD v1 training objective, kept out of the network: epsilon-prediction MSE.

t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(z0, t, eps), loss = mean((unet(x_t, t, c) - eps)^2).
(CompVis: l_simple_weight 1, original_elbo_weight 0, logvar 0, so the loss is the plain MSE.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.schedule import DDPMSchedule


@dataclass
class DiffusionDraw:
    """The random draw of one step, so a caller can log or replay it."""

    timesteps: torch.Tensor
    noise: torch.Tensor


def draw_noise(z0: torch.Tensor, num_timesteps: int, generator: torch.Generator | None = None) -> DiffusionDraw:
    t = torch.randint(0, num_timesteps, (z0.shape[0],), generator=generator, device=z0.device)
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=torch.float32)
    return DiffusionDraw(t, noise)


def epsilon_mse_loss(unet: torch.nn.Module, schedule: DDPMSchedule, z0: torch.Tensor, context: torch.Tensor,
                     draw: DiffusionDraw) -> torch.Tensor:
    x_t = schedule.q_sample(z0, draw.timesteps, draw.noise)
    prediction = unet(x_t, draw.timesteps, context)
    # The loss is reduced in fp32 even when the network runs in bf16/fp16.
    return F.mse_loss(prediction.float(), draw.noise.float())
