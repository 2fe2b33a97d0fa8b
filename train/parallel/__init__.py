"""Data-parallel engines: one function wraps the UNet per backend (DDP, FSDP2, DeepSpeed ZeRO).

The model code knows nothing of these; these know nothing of the loss: the trainer's step function
computes it, an engine only runs backward, accumulation, clipping, the optimiser step and the
sharded checkpoint of model + optimiser.
"""
from __future__ import annotations

from .base import Engine


def build_engine(cfg, unet, env, accumulation: int, lr_offset: int = 0) -> Engine:
    """lr_offset: optimiser steps already behind the LR schedule (a stage that continues the warmup)."""
    if cfg.backend == "ddp":
        from .ddp import DDPEngine

        return DDPEngine(cfg, unet, env, accumulation, lr_offset)
    if cfg.backend == "fsdp":
        from .fsdp import FSDPEngine

        return FSDPEngine(cfg, unet, env, accumulation, lr_offset)
    if cfg.backend == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, unet, env, accumulation, lr_offset)
    raise ValueError(f"backend={cfg.backend!r}: choose ddp, fsdp or deepspeed")
