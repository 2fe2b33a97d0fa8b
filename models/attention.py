"""Multi-head attention kernels behind one function, so every module picks its backend by name.

All backends take and return (batch, heads, tokens, head_dim) tensors and compute
softmax(q k^T / sqrt(head_dim)) v, as CompVis' CrossAttention does.

"sdpa" lets torch pick SDPA's kernel per call. "sdpa-flash", "sdpa-cudnn" and "sdpa-efficient" pin
one kernel: SD v1's head dims are 40, 80 and 160, and which kernel is fastest for 40 (FlashAttention
pads it to 64 inside the kernel; cuDNN's fused attention takes multiples of 8) is a question for a
measurement on the card (`bench/attention_step.py`), not a default to guess.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The pinned SDPA kernels, by the suffix of their backend name.
SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
# torch's own choice of SDPA kernel, then each pinned one.
SDPA_BACKENDS = ("sdpa", *(f"sdpa-{name}" for name in SDPA_KERNELS))
BACKENDS = (*SDPA_BACKENDS, "xformers", "math")


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, dim=-1).to(v.dtype)
    return weights @ v


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:
        import xformers.ops as xops
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise RuntimeError(
            "attention_backend='xformers' but xformers is not installed: `pip install -e .[gpu]` on a CUDA "
            "machine, or use attention_backend='sdpa' (the default)"
        ) from err
    # xformers wants (batch, tokens, heads, head_dim).
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _pinned_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str) -> torch.Tensor:
    try:
        # torch.compile traces this context manager: the compiled graph calls the pinned kernel's op.
        with sdpa_kernel([SDPA_KERNELS[kernel]]):
            return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as err:
        if "No viable backend" not in str(err) and "No available kernel" not in str(err):
            raise
        raise RuntimeError(
            f"attention_backend='sdpa-{kernel}' has no kernel for these inputs (device {q.device.type}, "
            f"{q.dtype}, head dim {q.shape[-1]}; torch's warnings above say why): use attention_backend='sdpa' "
            "to let torch choose. On CPU only 'sdpa-flash' exists; cuDNN and efficient attention are CUDA kernels."
        ) from err


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend.startswith("sdpa-") and backend[5:] in SDPA_KERNELS:
        return _pinned_sdpa(q, k, v, backend[5:])
    if backend == "math":
        return _math(q, k, v)
    if backend == "xformers":
        return _xformers(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
