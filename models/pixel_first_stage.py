"""A parameter-free first stage for toy runs: "latents" are the image average-pooled by f=8, with a
zero fourth channel so the UNet keeps SD's 4 input channels; decoding upsamples back.

It keeps colour and coarse layout exactly, which a randomly initialised VAE would scramble: the
embedded miniature reproduction uses it so that what the UNet learns is visible in decoded images
without first training a VAE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PixelFirstStage(nn.Module):
    def __init__(self, factor: int = 8, channels: int = 4, scale_factor: float = 1.0):
        super().__init__()
        self.factor, self.channels, self.scale_factor = factor, channels, scale_factor

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = True) -> torch.Tensor:
        pooled = F.avg_pool2d(x.float(), self.factor)
        pad = torch.zeros(x.shape[0], self.channels - x.shape[1], *pooled.shape[2:], device=x.device)
        return self.scale_factor * torch.cat([pooled, pad], dim=1)

    @property
    def latent_bound(self) -> float:
        """Latents of images in [-1, 1] lie in [-bound, bound] (averages of pixels, scaled; the pad is 0):
        the range a pixel-space sampler clips its pred_x0 to (models/samplers.py, clip_x0)."""
        return self.scale_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        rgb = z[:, :3].float() / self.scale_factor
        return F.interpolate(rgb, scale_factor=self.factor, mode="nearest").clamp(-1, 1)
