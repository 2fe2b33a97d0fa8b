"""The SD-specific part of training: one micro-batch -> loss. Everything else in the loop is generic.

Frozen first stage and text encoder (no grad, eval): z = 0.18215 * (VAE posterior sample), context =
CLIP last hidden state (precomputed when the shards carry them), then the epsilon-MSE objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.schedule import DDPMSchedule
from train.objective import draw_noise, epsilon_mse_loss


@dataclass
class FrozenParts:
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    scale_factor: float


@torch.no_grad()
def encode_batch(batch: dict, frozen: FrozenParts, device: torch.device, generator: torch.Generator,
                 autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, context) for a batch of images, or of precomputed latents (posterior mean and std)."""
    with autocast:
        if "latent_mean" in batch:
            mean = batch["latent_mean"].to(device, torch.float32)
            std = batch["latent_std"].to(device, torch.float32)
            noise = torch.randn(mean.shape, generator=generator, device=device)
            z = frozen.scale_factor * (mean + std * noise)
        else:
            z = frozen.vae.encode_latents(batch["pixels"].to(device), generator=generator)
        if "context" in batch:
            context = batch["context"].to(device)
        else:
            context = frozen.text_encoder(batch["input_ids"].to(device))
    return z.float(), context.float()


def training_loss(batch: dict, unet: torch.nn.Module, frozen: FrozenParts, schedule: DDPMSchedule,
                  device: torch.device, generator: torch.Generator, encode_autocast, unet_autocast) -> torch.Tensor:
    z, context = encode_batch(batch, frozen, device, generator, encode_autocast)
    draw = draw_noise(z, schedule.num_timesteps, generator)
    with unet_autocast:
        return epsilon_mse_loss(unet, schedule, z, context, draw)
