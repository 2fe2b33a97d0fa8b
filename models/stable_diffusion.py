"""The four parts of SD v1 side by side, and their conversion to and from the original `.ckpt`.

There is no wrapper module owning everything: the trainer holds the UNet (trained, sharded), the
frozen VAE and text encoder, and the schedule, each on its own. The original file layout is
produced and consumed by `models.adapters.ldm_checkpoint`.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import ldm_checkpoint as ldm
from .adapters.keys import KeyMismatchError, check_shapes, load_strict
from .configs import SDConfig
from .schedule import BUFFER_NAMES, DDPMSchedule, schedule_buffers
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
    # LitEma's update count (model_ema.num_updates) where the checkpoint records one.
    ema_num_updates: int | None = None


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


def split_ldm(sd: dict[str, torch.Tensor], cfg: SDConfig, path: str | Path = "checkpoint") -> ldm.LDMWeights:
    shapes = build_models(cfg, "meta")
    return ldm.split_state_dict(_with_schedule(sd, cfg, path), _keys(shapes.unet), _keys(shapes.vae),
                                _keys(shapes.text_encoder), _keys(shapes.schedule))


def _with_schedule(sd: dict[str, torch.Tensor], cfg: SDConfig, path: str | Path) -> dict[str, torch.Tensor]:
    """`sd` with the 12 schedule buffers. Files without any (diffusers' convert_diffusers_to_original_stable_
    diffusion.py writes only the UNet, VAE and text encoder) get the config's, which is what the released
    files hold; a file with only some of them is damaged and refused."""
    present = [k for k in BUFFER_NAMES if k in sd]
    if len(present) == len(BUFFER_NAMES):
        return sd
    if present:
        missing = [k for k in BUFFER_NAMES if k not in sd]
        raise ValueError(f"{path}: holds {len(present)} of the 12 noise-schedule buffers (missing "
                         f"{', '.join(missing)}); a checkpoint holds all of them, or none (then they are derived "
                         "from the architecture's schedule)")
    s = cfg.schedule
    print(f"note: {path} holds no noise-schedule buffers (betas, alphas_cumprod, ...); using the architecture's "
          f"({s.timesteps} steps, linear_start={s.linear_start}, linear_end={s.linear_end})",
          file=sys.stderr)
    return {**schedule_buffers(s), **sd}


def _check_schedule(stored: dict[str, torch.Tensor], schedule: DDPMSchedule, path: Path) -> None:
    """The file's schedule buffers must be ours, compared at the precision the file stores them in: a
    float16/bfloat16 file holds our float32 buffers rounded (to ~1e-3 / ~8e-3 relative)."""
    ours = schedule.state_dict()
    off, dtypes = [], set()
    for k, want in ours.items():
        got = stored[k]
        dtype = got.dtype if got.is_floating_point() and got.element_size() < 4 else torch.float32
        dtypes.add(dtype)
        # One unit in the last place of the stored dtype (rounding our float32 value twice may reach it).
        rtol = max(1e-5, torch.finfo(dtype).eps)
        if got.shape != want.shape or not torch.allclose(got.double(), want.to(dtype).double(), rtol=rtol,
                                                         atol=torch.finfo(dtype).tiny):
            off.append(k)
    if not off:
        return
    low = sorted(str(d).removeprefix("torch.") for d in dtypes if d != torch.float32)
    precision = (f" The file stores them in {'/'.join(low)} and they were compared at that precision, so this "
                 "is not rounding: the checkpoint was made with another schedule." if low else "")
    betas, s = stored["betas"].double().flatten(), schedule.cfg
    raise ValueError(
        f"{path}: its noise schedule differs from the one this framework builds ({', '.join(off)}): the file has "
        f"{betas.numel()} steps, betas {betas[0].item():.3g} to {betas[-1].item():.3g}; the architecture's has "
        f"{s.timesteps}, betas {s.linear_start:.3g} to {s.linear_end:.3g}.{precision} Sampling or training "
        "from it with that schedule would be wrong, and no setting changes it.")


def _fits(sd: dict[str, torch.Tensor], cfg: SDConfig) -> bool:
    """Whether the UNet, VAE and text-encoder weights of `sd` have exactly this architecture's keys and shapes."""
    m = build_models(cfg, "meta")
    want = {}
    for prefix, module in ((ldm.UNET, m.unet), (ldm.VAE, m.vae), (ldm.TEXT, m.text_encoder)):
        want.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})
    return want == {k: tuple(v.shape) for k, v in sd.items()
                    if k.startswith((ldm.UNET, ldm.VAE, ldm.TEXT)) and k != ldm.POSITION_IDS}


def layout_error(err: KeyMismatchError, sd: dict[str, torch.Tensor], path: str | Path,
                 archs: Mapping[str, Callable[[], SDConfig]] | None = None) -> KeyMismatchError:
    """The error for a file whose keys do not fit the architecture asked for: when one of `archs` (name ->
    config) fits it, a short message naming the --arch to pass; else the key listing and a hint."""
    fits = [name for name, make in (archs or {}).items() if _fits(sd, make())]
    if fits:
        summary = ", ".join(line.strip().rstrip(":") for line in str(err).splitlines() if not line.startswith("    "))
        return KeyMismatchError(f"{path}: not a checkpoint of the architecture asked for ({summary}); its weights "
                                f"are those of --arch {' or '.join(fits)}")
    return KeyMismatchError(f"{path}: {err}\n(is the architecture right? tiny models need --arch tiny)")


def load_ldm_checkpoint(path: str | Path, cfg: SDConfig,
                        archs: Mapping[str, Callable[[], SDConfig]] | None = None) -> SDModels:
    """Load an original `sd-v1-*.ckpt` (EMA-only or full-ema) or its safetensors twin, strictly. `archs`
    (name -> config): the architectures a mismatch names when the file is one of them."""
    path = Path(path)
    sd, step = ldm.read_checkpoint(path)
    try:  # check every key and shape against a meta-device copy before paying for a real model
        weights = split_ldm(sd, cfg, path)
        shapes = build_models(cfg, "meta")
        check_shapes(_shapes(shapes.unet), weights.unet, "UNet")
        check_shapes(_shapes(shapes.vae), weights.vae, "VAE")
        check_shapes(_shapes(shapes.text_encoder), weights.text_encoder, "text encoder")
        if weights.unet_ema is not None:
            check_shapes(_shapes(shapes.unet), weights.unet_ema, "UNet EMA")
    except KeyMismatchError as err:
        raise layout_error(err, sd, path, archs) from None
    m = build_models(cfg)
    load_strict(m.unet, weights.unet, "UNet")
    load_strict(m.vae, weights.vae, "VAE")
    load_strict(m.text_encoder, weights.text_encoder, "text encoder")
    _check_schedule(weights.schedule, m.schedule, path)
    m.unet_ema, m.global_step, m.ema_num_updates = weights.unet_ema, step, weights.ema_num_updates
    return m


def save_ldm_checkpoint(path: str | Path, m: SDModels, ema_only: bool = False) -> None:
    ldm.write_checkpoint(path, ldm_state_dict(m, ema_only=ema_only), m.global_step)
