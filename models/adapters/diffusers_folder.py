"""A diffusers pipeline folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json.

Each component is a config.json plus one safetensors file, the names diffusers and transformers
read (reading also takes its fp16/bf16 variant file when that is the only one). The scheduler written
is the PNDM (PLMS) config the SD v1 diffusers releases ship.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import diffusers_text, diffusers_unet, diffusers_vae
from ..configs import SDConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
# diffusers' `variant`s that hold the same weights at lower precision (fp16 releases ship only these).
PRECISION_VARIANTS = ("fp16", "bf16")


def scheduler_config(cfg: SDConfig) -> dict:
    s = cfg.schedule
    return {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": s.timesteps,
        "beta_start": s.linear_start,
        "beta_end": s.linear_end,
        # SD v1's "linear" (linspace of square roots, squared) is diffusers' "scaled_linear".
        "beta_schedule": "scaled_linear",
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "clip_sample": False,
    }


def model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def _write_component(folder: Path, config: dict, tensors: dict[str, torch.Tensor], weights_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / weights_name),
              metadata={"format": "pt"})


def weights_file(folder: Path, weights_name: str) -> Path:
    """The component's weights: `weights_name`, else its one precision variant (`*.fp16.safetensors` or
    `*.bf16.safetensors`, what diffusers' save_pretrained(variant=...) writes and from_pretrained(variant=...)
    reads). The plain file wins when both are there: it is the full-precision copy."""
    plain = folder / weights_name
    if plain.is_file():
        return plain
    stem, suffix = weights_name.rsplit(".", 1)
    accepted = [f"{stem}.{v}.{suffix}" for v in PRECISION_VARIANTS]
    found = [folder / name for name in accepted if (folder / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{folder} holds {' and '.join(p.name for p in found)} but no {weights_name}: "
                         "keep one of them (or add the full-precision file) so it is clear which to load")
    if not found:
        raise FileNotFoundError(f"diffusers folder is missing {plain} (also accepted: {', '.join(accepted)}; "
                                "sharded weights are not supported)")
    return found[0]


def read_component(folder: Path, weights_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"diffusers folder is missing {config_path}")
    weights_path = weights_file(folder, weights_name)
    return json.loads(config_path.read_text()), load_file(str(weights_path))


def save_diffusers(folder: str | Path, cfg: SDConfig, unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor],
                   text_encoder: dict[str, torch.Tensor], tokenizer=None, sample_size: int = 64) -> Path:
    """Write a pipeline folder from our state dicts (`unet` is whichever UNet weights the caller chose)."""
    from ..tokenizer import CLIPTokenizer

    folder = Path(folder)
    _write_component(folder / "unet", diffusers_unet.diffusers_config(cfg.unet, sample_size),
                     diffusers_unet.to_diffusers(unet, cfg.unet), DIFFUSERS_WEIGHTS)
    _write_component(folder / "vae", diffusers_vae.diffusers_config(cfg.vae, sample_size * cfg.vae.downsample_factor),
                     diffusers_vae.to_diffusers(vae, cfg.vae), DIFFUSERS_WEIGHTS)
    _write_component(folder / "text_encoder", diffusers_text.diffusers_config(cfg.text),
                     diffusers_text.to_diffusers(text_encoder, cfg.text), TRANSFORMERS_WEIGHTS)
    (tokenizer or CLIPTokenizer()).write_hf_files(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(cfg), indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    return folder


def read_config(folder: str | Path) -> SDConfig:
    """The architecture and schedule a pipeline folder describes, from its config files alone (no weights)."""
    from ..configs import ScheduleConfig

    folder = Path(folder)
    configs = {}
    for part in ("unet", "vae", "text_encoder"):
        path = folder / part / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"diffusers folder is missing {path}")
        configs[part] = json.loads(path.read_text())
    schedule = ScheduleConfig()
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        s = json.loads(sched_path.read_text())
        if s.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise ValueError(f"{sched_path}: beta_schedule={s['beta_schedule']!r}; SD v1 uses 'scaled_linear'")
        schedule = ScheduleConfig(timesteps=s.get("num_train_timesteps", 1000),
                                  linear_start=s.get("beta_start", 0.00085), linear_end=s.get("beta_end", 0.012))
    return SDConfig(unet=diffusers_unet.config_from_diffusers(configs["unet"]),
                    vae=diffusers_vae.config_from_diffusers(configs["vae"]),
                    text=diffusers_text.config_from_diffusers(configs["text_encoder"]), schedule=schedule)


def load_diffusers(folder: str | Path) -> tuple[SDConfig, dict[str, dict[str, torch.Tensor]]]:
    """(config, {"unet", "vae", "text_encoder": our state dicts}) from a pipeline folder, strictly."""
    folder = Path(folder)
    cfg = read_config(folder)
    _, unet = read_component(folder / "unet", DIFFUSERS_WEIGHTS)
    _, vae = read_component(folder / "vae", DIFFUSERS_WEIGHTS)
    _, text = read_component(folder / "text_encoder", TRANSFORMERS_WEIGHTS)
    return cfg, {
        "unet": diffusers_unet.from_diffusers(unet, cfg.unet),
        "vae": diffusers_vae.from_diffusers(vae, cfg.vae),
        "text_encoder": diffusers_text.from_diffusers(text, cfg.text),
    }
