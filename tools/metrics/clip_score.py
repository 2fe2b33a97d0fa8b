"""CLIP score: the cosine similarity of open_clip image and caption embeddings, averaged over images.

It is the plain cosine, not torchmetrics' 100 * max(cos, 0): the SD v1 model card's axis reads about
0.25 for this CLIP ViT-L/14. torchmetrics is not used (its CLIPScore goes through transformers' CLIP
classes, which broke with transformers 5).

The weights come from a local file (`--clip`), any of:
  - OpenAI's `ViT-L-14.pt` (a TorchScript archive, as `clip.load` downloads it),
  - open_clip's state dict of those weights (`open_clip_pytorch_model.bin` / `.safetensors` of
    timm/vit_large_patch14_clip_224.openai), or any open_clip checkpoint of the architecture.
The OpenAI weights were trained with QuickGELU; open_clip's plain 'ViT-L-14' config uses GELU and would
load them silently but compute different embeddings, so quick_gelu is on by default (turn it off for
LAION-trained ViT-L-14 weights). Images go through open_clip's eval transform for the architecture
(ViT-L-14: bicubic resize of the short side to 224, centre crop, OpenAI mean/std); captions through its
tokenizer (77 tokens, longer captions truncated).
"""
from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_ARCH = "ViT-L-14"
# Entries a TorchScript archive of an OpenAI CLIP carries besides the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/", 1)[-1].startswith("code/") or name.endswith("/constants.pkl") for name in z.namelist())


def read_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CLIP weights at {path}: pass OpenAI's ViT-L-14.pt or an open_clip state dict "
                                "(open_clip_pytorch_model.bin of timm/vit_large_patch14_clip_224.openai)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif _is_torchscript(path):
        # TorchScript is loaded by torch's own interpreter; only its weights are kept.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, OpenAI's file is what it is
            scripted = torch.jit.load(str(path), map_location="cpu")
        state = {k: v for k, v in scripted.state_dict().items() if k not in _OPENAI_EXTRA_KEYS}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: no state dict of tensors in it")
    if all(k.startswith("module.") for k in state):  # open_clip training checkpoints (DDP)
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class CLIPScorer:
    """open_clip model + its eval transform + its tokenizer, in eval mode."""

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, device: torch.device):
        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device

    def preprocess_images(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        return torch.stack([self.preprocess(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)))
                            for im in images])

    @torch.no_grad()
    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [B, 3, S, S] -> unit-norm embeddings float64 [B, D]."""
        e = self.model.encode_image(pixels.to(self.device)).double()
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        e = self.model.encode_text(self.tokenizer(list(captions)).to(self.device)).double()
        return e / e.norm(dim=-1, keepdim=True)

    def scores_from_pixels(self, pixels: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Cosine similarity per (image, caption) pair, float64 [B] on the CPU."""
        if pixels.shape[0] != len(captions):
            raise ValueError(f"{pixels.shape[0]} images but {len(captions)} captions")
        return (self.image_embeddings(pixels) * self.text_embeddings(captions)).sum(-1).cpu()

    def scores(self, images: Sequence[Image.Image | np.ndarray], captions: Sequence[str]) -> torch.Tensor:
        return self.scores_from_pixels(self.preprocess_images(images), captions)


def load_clip(path: str | os.PathLike, arch: str = DEFAULT_ARCH, quick_gelu: bool = True,
              device: torch.device | str = "cpu") -> CLIPScorer:
    """open_clip.create_model(arch, pretrained=None) with the local weights loaded strictly. `arch` is an
    open_clip config name or the path of a config .json (registered under its file name)."""
    import open_clip

    if arch.endswith(".json") and Path(arch).is_file():
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None,
                                                                 force_quick_gelu=quick_gelu)
    state = read_clip_state_dict(path)
    # Buffers the model computes itself (the causal attention mask) may be stored by TorchScript archives.
    computed = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in state.items() if k not in computed}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: these weights are not an open_clip {arch!r} (--clip-arch):\n{err}") from None
    device = torch.device(device)
    return CLIPScorer(model.eval().requires_grad_(False).to(device), preprocess, open_clip.get_tokenizer(arch), device)
