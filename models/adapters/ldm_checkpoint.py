"""The original CompVis `sd-v1-*.ckpt` layout: a Lightning dict {"state_dict": ..., "global_step": ...}.

Keys (see tests/assets/sd_v1_state_dict.json): the 12 schedule buffers at top level,
`model.diffusion_model.*` (UNet), `model_ema.*` (LitEma shadows: the UNet name with its dots removed,
plus `decay` and `num_updates`), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.text_model.*` (CLIP text encoder). Released EMA-only files
(`sd-v1-N.ckpt`) hold the EMA weights under `model.diffusion_model.*`; `-full-ema` files hold the raw
weights there and the EMA weights under `model_ema.*`.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .keys import KeyMismatchError, check_keys

UNET = "model.diffusion_model."
EMA = "model_ema."
VAE = "first_stage_model."
TEXT = "cond_stage_model."
EMA_DECAY, EMA_NUM_UPDATES = "model_ema.decay", "model_ema.num_updates"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def lit_ema_name(unet_key: str) -> str:
    """LitEma's buffer name for a UNet parameter: the DiffusionWrapper path with its dots removed."""
    return EMA + ("diffusion_model." + unet_key).replace(".", "")


@dataclass
class LDMWeights:
    """An original checkpoint split into component state dicts (our module keys, no prefixes)."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    schedule: dict[str, torch.Tensor]
    unet_ema: dict[str, torch.Tensor] | None = None
    ema_decay: float | None = None
    ema_num_updates: int | None = None
    global_step: int | None = None

    def pick_unet(self, ema: bool | None) -> tuple[dict[str, torch.Tensor], str]:
        """The UNet weights to use and a sentence saying which they are.

        ema=None takes the EMA weights when the file has both (what inference wants), else the one copy.
        """
        if self.unet_ema is not None:
            if ema is False:
                return self.unet, "raw (non-EMA) UNet weights from model.diffusion_model.*"
            return self.unet_ema, "EMA UNet weights from model_ema.*"
        if ema is False:
            raise ValueError(
                "--no-ema: this checkpoint has a single copy of the UNet (no model_ema.* keys). Released "
                "sd-v1-N.ckpt files store the EMA weights there; the raw weights exist only in -full-ema files")
        return self.unet, "the single UNet copy in model.diffusion_model.* (EMA weights in released EMA-only files)"


def split_state_dict(sd: Mapping[str, torch.Tensor], unet_keys: list[str], vae_keys: list[str],
                     text_keys: list[str], schedule_keys: list[str]) -> LDMWeights:
    """Strictly split a full original state dict: every key must belong somewhere, none may be missing."""
    sd = dict(sd)
    if POSITION_IDS in sd:  # persistent only in transformers 4.6-4.30: accept it, but only if it is the identity
        ids = sd.pop(POSITION_IDS)
        if not torch.equal(ids.flatten().long(), torch.arange(ids.numel())):
            raise ValueError(f"{POSITION_IDS} is not arange({ids.numel()}); this is not a CLIP text encoder we know")
    ema_names = {lit_ema_name(k): k for k in unet_keys}
    has_ema = any(k in ema_names for k in sd)  # decay/num_updates alone (EMA-only files) are not a copy
    expected = ([UNET + k for k in unet_keys] + [VAE + k for k in vae_keys] + [TEXT + k for k in text_keys]
                + list(schedule_keys))
    if has_ema:
        expected += list(ema_names)
    optional = {EMA_DECAY, EMA_NUM_UPDATES}
    check_keys(expected, set(sd) - (optional & set(sd)), "original SD checkpoint")

    def take(prefix: str, keys: list[str]) -> dict[str, torch.Tensor]:
        return {k: sd[prefix + k] for k in keys}

    return LDMWeights(
        unet=take(UNET, unet_keys),
        vae=take(VAE, vae_keys),
        text_encoder=take(TEXT, text_keys),
        schedule={k: sd[k] for k in schedule_keys},
        unet_ema={unet_key: sd[name] for name, unet_key in ema_names.items()} if has_ema else None,
        ema_decay=float(sd[EMA_DECAY]) if EMA_DECAY in sd else None,
        ema_num_updates=int(sd[EMA_NUM_UPDATES]) if EMA_NUM_UPDATES in sd else None,
    )


def join_state_dict(w: LDMWeights, ema_only: bool = False, position_ids: int | None = 77) -> dict[str, torch.Tensor]:
    """The original state dict, in the original key order.

    ema_only: write an `sd-v1-N.ckpt`-style file whose model.diffusion_model.* are the EMA weights.
    position_ids: length of the `position_ids` buffer to write (the released files have it), None for none.
    """
    if ema_only and w.unet_ema is None:
        raise ValueError("ema_only=True but there are no EMA weights to write")
    sd: dict[str, torch.Tensor] = dict(w.schedule)
    unet = w.unet_ema if ema_only else w.unet
    sd.update({UNET + k: v for k, v in unet.items()})
    # LitEma's decay/num_updates: kept when the source had them, written (LitEma's defaults where unknown)
    # with an EMA copy; an EMA-only file without them (e.g. pruned) stays without them.
    if w.unet_ema is not None or w.ema_decay is not None or w.ema_num_updates is not None:
        sd[EMA_DECAY] = torch.tensor(0.9999 if w.ema_decay is None else w.ema_decay, dtype=torch.float32)
        sd[EMA_NUM_UPDATES] = torch.tensor(w.ema_num_updates or 0, dtype=torch.int32)
    if w.unet_ema is not None and not ema_only:
        sd.update({lit_ema_name(k): v for k, v in w.unet_ema.items()})
    sd.update({VAE + k: v for k, v in w.vae.items()})
    if position_ids:
        sd[POSITION_IDS] = torch.arange(position_ids, dtype=torch.int64)[None]
    sd.update({TEXT + k: v for k, v in w.text_encoder.items()})
    return sd


class _LightningModelCheckpointState:
    """Inert stand-in for Lightning's ModelCheckpoint callback state found in some `.ckpt` files.

    It is allow-listed for the weights-only unpickler under Lightning's name, so such files load
    without importing Lightning or running any of its code; its contents are ignored.
    """

    def __setstate__(self, state):
        self.state = state


_LIGHTNING_STUBS = []
for _module in ("pytorch_lightning.callbacks.model_checkpoint", "lightning.pytorch.callbacks.model_checkpoint"):
    _stub = type("ModelCheckpoint", (_LightningModelCheckpointState,), {"__module__": _module})
    _LIGHTNING_STUBS.append(_stub)


def _torch_load_weights_only(path: Path) -> dict:
    import numpy as np

    safe = [*_LIGHTNING_STUBS, np.dtype, np._core.multiarray.scalar, np.dtypes.Float64DType, np.dtypes.Int64DType]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refusing to load: this pickle needs code beyond tensors and plain containers to load "
            f"({str(err).splitlines()[0]}). Loading it would execute that code. Re-save it in a trusted "
            "environment as safetensors (or as a dict of tensors) and convert that file.") from err


FILE_FORMATS = ("ckpt", "safetensors")


def file_format(path: str | Path, fmt: str | None = None) -> str:
    """`fmt` when given ("ckpt": a torch pickle, "safetensors"), else the one the file name says."""
    if fmt is None:
        return "safetensors" if Path(path).suffix == ".safetensors" else "ckpt"
    if fmt not in FILE_FORMATS:
        raise ValueError(f"file format {fmt!r}: choose one of {', '.join(FILE_FORMATS)}")
    return fmt


def read_checkpoint(path: str | Path, fmt: str | None = None) -> tuple[dict[str, torch.Tensor], int | None]:
    """(state_dict, global_step) from a Lightning `.ckpt`/`.pt`/`.pth` or a `.safetensors` file; `fmt`
    ("ckpt" or "safetensors") overrides what the suffix says."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if file_format(path, fmt) == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        step = meta.get("global_step")
        return sd, int(step) if step is not None else None
    obj = _torch_load_weights_only(path)
    if isinstance(obj, dict) and "state_dict" in obj:
        step = obj.get("global_step")
        return obj["state_dict"], int(step) if step is not None else None
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise KeyMismatchError(f"{path}: not an SD checkpoint (expected a dict with 'state_dict', or a dict of tensors)")


def write_checkpoint(path: str | Path, sd: Mapping[str, torch.Tensor], global_step: int | None,
                     fmt: str | None = None) -> None:
    """Write what the original code loads: `torch.load(p)["state_dict"]` (and `["global_step"]`), or its
    safetensors twin; `fmt` ("ckpt" or "safetensors") overrides what the suffix says."""
    path = Path(path)
    fmt = file_format(path, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"global_step": str(global_step or 0), "format": "pt"})
    else:
        torch.save({"state_dict": tensors, "global_step": global_step or 0}, path)
