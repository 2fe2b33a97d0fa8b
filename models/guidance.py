"""Classifier-free guidance as CompVis txt2img does it: eps = e_uncond + s * (e_cond - e_uncond), where
e_uncond is the UNet on the context of the empty prompt, CLIP(""), and both halves run as one batch."""
from __future__ import annotations

import torch
from torch import nn

from .text_encoder import FrozenCLIPTextEncoder, encode_prompts


def unconditional_context(tokenizer, text_encoder: FrozenCLIPTextEncoder) -> torch.Tensor:
    """CLIP("") [1, 77, C]: the original's `model.get_learned_conditioning([""])` (<bos><eos> and padding)."""
    return encode_prompts(tokenizer, text_encoder, [""])


class ClassifierFreeGuidance:
    """An epsilon predictor `(x, t, cond) -> eps` for the samplers, guiding `unet` at `scale`.

    scale == 1 is the plain conditional model and costs one UNet batch, as in the original (which skips
    the unconditional half when scale is 1). The combination runs in the UNet's output dtype, as under
    the original's autocast; the samplers take it on in float32.
    """

    def __init__(self, unet: nn.Module, uncond: torch.Tensor, scale: float):
        if uncond.ndim != 3 or uncond.shape[0] != 1:
            raise ValueError(f"uncond must be one context [1, 77, C], got shape {tuple(uncond.shape)}")
        self.unet, self.uncond, self.scale = unet, uncond, float(scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.unet(x, t, cond)
        uncond = self.uncond.to(device=cond.device, dtype=cond.dtype).expand(cond.shape[0], -1, -1)
        e_uncond, e_cond = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        return e_uncond + self.scale * (e_cond - e_uncond)
