"""Image decode -> shorter-side resize -> square crop, done as cheaply as the result allows.

Two savings over "decode the full image, resize, crop" (the plain webdataset + PIL pipeline):
- `Image.draft()` makes libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain, choosing the
  smallest scale whose shorter side is still >= the target, so a 2048 px LAION image bound for 256
  decodes as 256 px and never exists at full size. DCT scaling averages like an area filter, so
  the result is a clean downscale, not a subsampled one.
- The crop box is passed to `resize(box=...)`, which resamples only the pixels that end up in the
  output instead of resizing the whole image and throwing part of it away.
Output is uint8 HWC; conversion to float [-1, 1] happens once per batch (`to_pixels`).
"""
from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image

CROPS = ("center", "random")
RESIZES = ("shorter_side",)


def decode_resize_crop(data: bytes, resolution: int, crop: str = "center", rng: random.Random | None = None) -> np.ndarray:
    """uint8 [resolution, resolution, 3]. Raises (OSError, SyntaxError, ValueError, ...) on data
    PIL cannot decode, including a truncated JPEG."""
    image = Image.open(io.BytesIO(data))
    w, h = image.size
    # draft() guarantees each side >= the requested one; ask for the shorter side at `resolution`.
    scale = resolution / min(w, h)
    image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    image = to_rgb(image)
    w, h = image.size
    side = min(w, h)
    if crop == "center":
        left, top = (w - side) / 2, (h - side) / 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs the sample's rng")
        # Whole source pixels, so the crop is exactly reproducible from the rng alone.
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    else:
        raise ValueError(f"crop={crop!r}: choose one of {CROPS}")
    box = (left, top, left + side, top + side)
    out = image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, as img2dataset makes it: more than 8 bits scaled down (Pillow's convert clips 16-bit
    grey to 255, so 50% grey became white) and transparency composited onto white (convert drops the
    alpha, leaving whatever colour the transparent pixels hold: black, often)."""
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N; I is what older Pillows open 16-bit PNGs as
        values = np.asarray(image).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """float32 [B, 3, H, W] in [-1, 1] from uint8 HWC images (one conversion for the whole batch)."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return batch.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
