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
def encode_batch(batch: dict, frozen: FrozenParts, device: torch.device, generator: torch.Generator | None,
                 autocast, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, context) for a batch of images, or of precomputed latents (posterior mean and std). z0 is a
    posterior sample (the training objective, as CompVis' get_first_stage_encoding), or with
    `sample=False` the posterior's mean (`generator` unused).

    The copies are non-blocking: from the loader's pinned memory a blocking copy to the GPU would wait
    for the whole queue (a host sync every step)."""
    def to_device(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return t.to(device, dtype, non_blocking=True)

    with autocast:
        if "latent_mean" in batch:
            mean = to_device(batch["latent_mean"], torch.float32)
            std = to_device(batch["latent_std"], torch.float32)
            posterior = mean + std * torch.randn(mean.shape, generator=generator, device=device) if sample else mean
            z = frozen.scale_factor * posterior
        else:
            z = frozen.vae.encode_latents(to_device(batch["pixels"]), generator=generator, sample=sample)
        if "context" in batch:
            context = to_device(batch["context"])
        else:
            context = frozen.text_encoder(to_device(batch["input_ids"]))
    return z.float(), context.float()


def training_loss(batch: dict, unet: torch.nn.Module, frozen: FrozenParts, schedule: DDPMSchedule,
                  device: torch.device, generator: torch.Generator, encode_autocast, unet_autocast) -> torch.Tensor:
    z, context = encode_batch(batch, frozen, device, generator, encode_autocast)
    draw = draw_noise(z, schedule.num_timesteps, generator)
    with unet_autocast:
        return epsilon_mse_loss(unet, schedule, z, context, draw)
