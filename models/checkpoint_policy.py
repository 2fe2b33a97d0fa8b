"""Selective activation checkpointing for the UNet: what a block keeps for backward and what it recomputes.

Full checkpointing recomputes a whole block (every convolution, matmul and attention: about one more
forward, +33% FLOPs). Most of a block's activation memory, though, is in cheap ops: GroupNorm (computed
in fp32), SiLU, LayerNorm, GEGLU's gate, residual adds. This policy saves the outputs of the expensive
ops (convolutions, matmuls, attention) and recomputes only the cheap ones, so the backward pays a few
bandwidth-bound kernels instead of a second forward.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten


def _expensive_ops() -> set:
    names = ("convolution.default", "mm.default", "addmm.default", "bmm.default", "baddbmm.default",
             "_scaled_dot_product_flash_attention.default", "_scaled_dot_product_efficient_attention.default",
             "_scaled_dot_product_cudnn_attention.default", "_scaled_dot_product_flash_attention_for_cpu.default",
             "_efficient_attention_forward.default", "_flash_attention_forward.default")
    ops = set()
    for name in names:
        packet, overload = name.split(".")
        if hasattr(aten, packet):  # attention kernels differ between builds
            ops.add(getattr(getattr(aten, packet), overload))
    return ops


SAVED_OPS = frozenset(_expensive_ops())


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_context():
    """`context_fn` for torch.utils.checkpoint(use_reentrant=False)."""
    return create_selective_checkpoint_contexts(_policy)
