"""The four parts of SD v1 side by side, and their conversion to and from the original `.ckpt`.

There is no wrapper module owning everything: the trainer holds the UNet (trained, sharded), the
frozen VAE and text encoder, and the schedule, each on its own. The original file layout is
produced and consumed by `models.adapters.ldm_checkpoint`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import ldm_checkpoint as ldm
from .adapters.keys import KeyMismatchError, check_shapes, load_strict
from .configs import SDConfig
from .schedule import DDPMSchedule
from .text_encoder import FrozenCLIPTextEncoder
from .unet import UNetModel
from .pixel_first_stage import PixelFirstStage
from .vae import AutoencoderKL


@dataclass
class SDModels:
    cfg: SDConfig
    unet: UNetModel
    vae: AutoencoderKL | PixelFirstStage
    text_encoder: FrozenCLIPTextEncoder
    schedule: DDPMSchedule
    # EMA weights of the UNet, when a checkpoint carried them separately (keys as unet.state_dict()).
    unet_ema: dict[str, torch.Tensor] | None = None
    global_step: int | None = None


def build_models(cfg: SDConfig, device: torch.device | str | None = None) -> SDModels:
    """Randomly initialised parts (or shapes only, on device='meta'); the frozen parts in eval mode."""
    with torch.device(device or "cpu"):
        unet = UNetModel(cfg.unet)
        vae = (AutoencoderKL(cfg.vae) if cfg.first_stage == "vae" else PixelFirstStage()).eval().requires_grad_(False)
        text = FrozenCLIPTextEncoder(cfg.text)
        if cfg.text_token_init_std is not None:
            torch.nn.init.normal_(text.transformer.text_model.embeddings.token_embedding.weight, 0.0,
                                  cfg.text_token_init_std)
        schedule = DDPMSchedule(cfg.schedule)
    return SDModels(cfg, unet, vae, text, schedule)


def _keys(module: torch.nn.Module) -> list[str]:
    return list(module.state_dict().keys())


def _shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def to_ldm_weights(m: SDModels, unet_ema: dict[str, torch.Tensor] | None = None, ema_decay: float | None = None,
                   ema_num_updates: int | None = None) -> ldm.LDMWeights:
    ema = unet_ema if unet_ema is not None else m.unet_ema
    return ldm.LDMWeights(
        unet=m.unet.state_dict(), vae=m.vae.state_dict(), text_encoder=m.text_encoder.state_dict(),
        schedule=m.schedule.state_dict(), unet_ema=ema, ema_decay=ema_decay, ema_num_updates=ema_num_updates,
        global_step=m.global_step)


def ldm_state_dict(m: SDModels, ema_only: bool = False, **ema) -> dict[str, torch.Tensor]:
    """The original checkpoint's state dict for these models (see `ldm.join_state_dict`)."""
    return ldm.join_state_dict(to_ldm_weights(m, **ema), ema_only=ema_only,
                               position_ids=m.cfg.text.max_position_embeddings)


def split_ldm(sd: dict[str, torch.Tensor], cfg: SDConfig) -> ldm.LDMWeights:
    shapes = build_models(cfg, "meta")
    return ldm.split_state_dict(sd, _keys(shapes.unet), _keys(shapes.vae), _keys(shapes.text_encoder),
                                _keys(shapes.schedule))


def _check_schedule(stored: dict[str, torch.Tensor], schedule: DDPMSchedule, path: Path) -> None:
    ours = schedule.state_dict()
    off = [k for k in ours if not torch.allclose(stored[k].float(), ours[k], rtol=1e-5, atol=1e-8)]
    if off:
        raise ValueError(f"{path}: its noise schedule differs from the config's ({', '.join(off)}); "
                         "set schedule.linear_start/linear_end/timesteps to the checkpoint's")


def load_ldm_checkpoint(path: str | Path, cfg: SDConfig) -> SDModels:
    """Load an original `sd-v1-*.ckpt` (EMA-only or full-ema) or its safetensors twin, strictly."""
    path = Path(path)
    sd, step = ldm.read_checkpoint(path)
    try:  # check every key and shape against a meta-device copy before paying for a real model
        weights = split_ldm(sd, cfg)
        shapes = build_models(cfg, "meta")
        check_shapes(_shapes(shapes.unet), weights.unet, "UNet")
        check_shapes(_shapes(shapes.vae), weights.vae, "VAE")
        check_shapes(_shapes(shapes.text_encoder), weights.text_encoder, "text encoder")
        if weights.unet_ema is not None:
            check_shapes(_shapes(shapes.unet), weights.unet_ema, "UNet EMA")
    except KeyMismatchError as err:
        raise KeyMismatchError(f"{path}: {err}\n(is the architecture right? tiny models need --arch tiny)") from None
    m = build_models(cfg)
    load_strict(m.unet, weights.unet, "UNet")
    load_strict(m.vae, weights.vae, "VAE")
    load_strict(m.text_encoder, weights.text_encoder, "text encoder")
    _check_schedule(weights.schedule, m.schedule, path)
    m.unet_ema, m.global_step = weights.unet_ema, step
    return m


def save_ldm_checkpoint(path: str | Path, m: SDModels, ema_only: bool = False) -> None:
    ldm.write_checkpoint(path, ldm_state_dict(m, ema_only=ema_only), m.global_step)
