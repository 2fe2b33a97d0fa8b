"""FLOPs per image and GPU peaks, for TFLOP/s and MFU reported by the trainer and the benchmarks.

FLOPs are counted, not estimated: torch's FlopCounterMode on one forward of the model on the meta
device (no memory, no compute), times 3 for forward + backward. SD v1 UNet: 540.3 GFLOP per image at
256 px (32x32 latents), 2,409.8 at 512 px (64x64) (issue #7 quotes 537 / 2,407; bench/RESULTS.md). The frozen encoders run forward only: the VAE encoder
273 / 1,117 GFLOP per image at 256 / 512 px, the CLIP text encoder 13 per caption.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.configs import TextEncoderConfig, UNetConfig, VAEConfig

# Dense (no sparsity) peak TFLOP/s by device-name fragment and dtype; fp32 means TF32 tensor cores.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},  # SXM; the PCIe card is lower (756)
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "V100": {"bf16": None, "fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device: str | torch.device, dtype: str, gpu_name: str | None = None) -> float | None:
    """The device's dense peak for `dtype`, or None where we have no table entry (e.g. CPUs). `gpu_name`
    (cluster.gpu_name) names the card instead of the driver's name for it, e.g. "H100 PCIe" where the
    driver's string does not say which H100."""
    if torch.device(device).type != "cuda":
        return None
    name = gpu_name or torch.cuda.get_device_name(torch.device(device))
    if "H100" in name and "PCIe" in name:
        return {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}[dtype]
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks.get(dtype)
    return None


@lru_cache(maxsize=32)
def unet_train_flops_per_image(cfg: UNetConfig, latent_size: int) -> float:
    """Forward + backward FLOPs of one image through the UNet (3x the counted forward)."""
    from models.unet import UNetModel

    with torch.device("meta"):
        unet = UNetModel(cfg)
        x = torch.empty(1, cfg.in_channels, latent_size, latent_size)
        t = torch.zeros(1, dtype=torch.long)
        ctx = torch.empty(1, 77, cfg.context_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, t, ctx)
    return 3.0 * counter.get_total_flops()


@lru_cache(maxsize=8)
def vae_encode_flops_per_image(cfg: VAEConfig, resolution: int) -> float:
    """The VAE encoder's forward on one image (SD v1: 273 GFLOP at 256 px, 1,117 at 512)."""
    from models.vae import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
        x = torch.empty(1, 3, resolution, resolution)
        with FlopCounterMode(display=False) as counter:
            vae.encode(x)
    return float(counter.get_total_flops())


@lru_cache(maxsize=8)
def text_encode_flops_per_caption(cfg: TextEncoderConfig) -> float:
    """The CLIP text encoder's forward on one 77-token caption (SD v1's ViT-L/14: 13 GFLOP)."""
    from models.text_encoder import FrozenCLIPTextEncoder

    with torch.device("meta"):
        encoder = FrozenCLIPTextEncoder(cfg)
        ids = torch.zeros(1, 77, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            encoder(ids)
    return float(counter.get_total_flops())
