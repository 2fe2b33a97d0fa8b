"""Shard format for precomputed VAE latents (and optionally CLIP text embeddings).

A latent shard is a WebDataset tar, one sample per image, members:
- `{key}.latent.npy`: float16 [2, 4, h, w] = the frozen VAE's posterior mean and std, *unscaled*
  (the trainer samples mean + std * eps and multiplies by VAEConfig.scale_factor itself, so the
  shards stay valid whatever scale factor a run uses). Storing the posterior, not one sample of it,
  keeps the training noise of the original recipe: each epoch draws a fresh latent.
  float16 is enough: the mean needs ~3 significant digits, and std only scales the noise.
- `{key}.txt`: the caption (always: the loader tokenises it and applies caption dropout).
- `{key}.json`: the image's metadata, as in the image shards.
- `{key}.ctx.npy` (optional): float16 [77, 768] CLIP ViT-L/14 last hidden state of the caption.
- `__uncond__.ctx.npy`: in every shard that has contexts, as its first member: CLIP("") with the
  same encoder. When caption dropout drops a caption the loader substitutes this, which is exactly
  what the text encoder would have produced for "" (SD's unconditional embedding). One copy per
  shard (116 KiB) keeps each shard self-contained, also behind a `pipe:` URL.
`.npy` rather than `.pth`: it loads without pickle, so a shard cannot run code.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import IO

import numpy as np

LATENT_EXT = "latent.npy"
CONTEXT_EXT = "ctx.npy"
UNCOND_KEY = "__uncond__"
LATENT_CHANNELS = 4
CONTEXT_SHAPE = (77, 768)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _as_numpy(x) -> np.ndarray:
    # Accepts torch tensors without importing torch here (the precompute tool passes them).
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def encode_latent(mean, std) -> bytes:
    mean, std = _as_numpy(mean), _as_numpy(std)
    if mean.shape != std.shape or mean.ndim != 3 or mean.shape[0] != LATENT_CHANNELS:
        raise ValueError(f"latent mean/std must both be [{LATENT_CHANNELS}, h, w], got {mean.shape} and {std.shape}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()):
        raise ValueError("latent mean/std must be finite and std >= 0")
    return npy_bytes(np.stack([mean, std]).astype(np.float16))


def encode_context(context) -> bytes:
    context = _as_numpy(context)
    if context.shape != CONTEXT_SHAPE:
        raise ValueError(f"text context must be {list(CONTEXT_SHAPE)}, got {list(context.shape)}")
    return npy_bytes(context.astype(np.float16))


def npy_shape(data: bytes) -> tuple[int, ...] | None:
    """The shape in an .npy header, without reading the array (None if it is not an .npy)."""
    try:
        buf = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(buf)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(buf)
        return tuple(shape)
    except (ValueError, EOFError):
        return None


def decode_latent(data: bytes, latent_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), float32 [4, latent_size, latent_size]. ValueError on anything else."""
    array = load_npy(data)
    if array.shape != (2, LATENT_CHANNELS, latent_size, latent_size):
        raise ValueError(f"latent of shape {list(array.shape)}, expected [2, {LATENT_CHANNELS}, {latent_size}, {latent_size}]")
    array = array.astype(np.float32)
    return array[0], array[1]


def decode_context(data: bytes) -> np.ndarray:
    array = load_npy(data)
    if array.shape != CONTEXT_SHAPE:
        raise ValueError(f"text context of shape {list(array.shape)}, expected {list(CONTEXT_SHAPE)}")
    return array.astype(np.float32)


class LatentShardWriter:
    """Writes one latent shard: `with LatentShardWriter(path_or_stream, uncond_context) as w:
    w.write(key, mean, std, caption, meta, context)`. Pass uncond_context (CLIP("")) whenever the
    samples carry contexts; the writer refuses a context without it. A stream target allows
    writing straight into `aws s3 cp - s3://...`."""

    def __init__(self, target: str | Path | IO[bytes], uncond_context=None):
        self._tar = (tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) if isinstance(target, (str, Path))
                     else tarfile.open(fileobj=target, mode="w|", format=tarfile.USTAR_FORMAT))
        self._has_uncond = uncond_context is not None
        self.count = 0
        if self._has_uncond:
            self._add(f"{UNCOND_KEY}.{CONTEXT_EXT}", encode_context(uncond_context))

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, mean, std, caption: str, meta: dict | None = None, context=None) -> None:
        if "." in key.rsplit("/", 1)[-1] or key == UNCOND_KEY:
            raise ValueError(f"sample key {key!r} must not contain a dot or be {UNCOND_KEY!r}")
        if context is not None and not self._has_uncond:
            raise ValueError("a sample with a text context needs the shard's uncond_context (CLIP(\"\")) for caption dropout")
        self._add(f"{key}.{LATENT_EXT}", encode_latent(mean, std))
        if context is not None:
            self._add(f"{key}.{CONTEXT_EXT}", encode_context(context))
        self._add(f"{key}.txt", caption.encode("utf-8"))
        self._add(f"{key}.json", json.dumps(meta or {}).encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "LatentShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
