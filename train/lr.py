"""SD v1's learning-rate schedule: a multiplier rising linearly from `start` to 1 over `warmup_steps`
optimiser steps, then constant (CompVis LambdaLinearScheduler with f_start 1e-6, f_max 1)."""
from __future__ import annotations

import torch


def warmup_multiplier(step: int, warmup_steps: int, start: float) -> float:
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * step / warmup_steps


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, start: float,
                    offset: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """`offset` continues a carried schedule (a stage that keeps the previous stage's warmup)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_multiplier(step + offset, warmup_steps, start))
