"""Multi-head attention kernels behind one function, so every module picks its backend by name.

All backends take and return (batch, heads, tokens, head_dim) tensors and compute
softmax(q k^T / sqrt(head_dim)) v, as CompVis' CrossAttention does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "xformers", "math")


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return _math(q, k, v)
    if backend == "xformers":
        return _xformers(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
