"""The frozen parts SD v1 started from, read where they were published, so that a reproduction from
LAION needs no released SD checkpoint:

- the VAE: the LDM autoencoder's own checkpoint (CompVis' `first_stage_config.params.ckpt_path`,
  `kl-f8/model.ckpt`, whose keys are ours plus `loss.*`: the LPIPS network and discriminator it was
  trained with), a diffusers `vae/` folder (e.g. a fine-tuned VAE), or the VAE of an SD checkpoint;
- the text encoder: a transformers folder, either a `CLIPTextModel` or the whole `CLIPModel`
  (openai/clip-vit-large-patch14, from which `FrozenCLIPEmbedder` took the text tower the same way).

Each returns a state dict in our layout; the caller loads it strictly into the model it built.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from models.adapters import ldm_checkpoint as ldm
from models.adapters.keys import KeyMismatchError
from models.configs import TextEncoderConfig, VAEConfig

AUTOENCODER_TRAINING_PREFIX = "loss."
# What a config may differ in without changing the function the weights compute: how attention is run,
# dropout (frozen parts run in eval mode), and CLIP's token ids and projection width (the conditioning is
# the last hidden state; openai/clip-vit-large-patch14's config names ids 0/1/2 that SD never reads).
_VAE_FREE = {"attention_backend", "dropout"}
_TEXT_FREE = {"bos_token_id", "eos_token_id", "pad_token_id", "projection_dim"}


def _differences(theirs, ours, free: set[str]) -> list[str]:
    return [f"{f.name}={getattr(theirs, f.name)!r} (the model has {getattr(ours, f.name)!r})"
            for f in dataclasses.fields(ours) if f.name not in free and getattr(theirs, f.name) != getattr(ours, f.name)]


def _component_folder(path: Path, name: str) -> Path:
    """A component folder, or the pipeline folder holding it as `name/`."""
    return path / name if (path / name / "config.json").is_file() else path


def vae_state_dict(path: str | os.PathLike, cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our VAE's weights from an LDM autoencoder checkpoint, an SD checkpoint or a diffusers VAE folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        from models.adapters import diffusers_vae
        from models.adapters.diffusers_folder import DIFFUSERS_WEIGHTS, read_component

        folder = _component_folder(path, "vae")
        config, tensors = read_component(folder, DIFFUSERS_WEIGHTS)
        off = _differences(diffusers_vae.config_from_diffusers(config), cfg, _VAE_FREE)
        if off:
            raise KeyMismatchError(f"{folder}: this VAE is not the one model.arch builds: {'; '.join(off)}")
        return diffusers_vae.from_diffusers(tensors, cfg)
    sd, _ = ldm.read_checkpoint(path)
    if any(k.startswith(ldm.VAE) for k in sd):  # a whole SD checkpoint
        return {k.removeprefix(ldm.VAE): v for k, v in sd.items() if k.startswith(ldm.VAE)}
    return {k: v for k, v in sd.items() if not k.startswith(AUTOENCODER_TRAINING_PREFIX)}


def text_encoder_state_dict(path: str | os.PathLike, cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Our text encoder's weights from a transformers CLIPTextModel / CLIPModel folder (or a diffusers
    pipeline folder's text_encoder/)."""
    from models.text_encoder import FrozenCLIPTextEncoder

    folder = _component_folder(Path(path).expanduser(), "text_encoder")
    encoder = FrozenCLIPTextEncoder.from_pretrained_dir(folder)
    off = _differences(encoder.cfg, cfg, _TEXT_FREE)
    if off:
        raise KeyMismatchError(f"{folder}: this text encoder is not the one model.arch builds: {'; '.join(off)}")
    return encoder.state_dict()
