"""Exponential moving average of the UNet, LitEma's rule: decay = min(max_decay, (1 + n) / (10 + n)),
n = the number of updates so far.

The EMA holds one fp32 tensor per parameter of whatever this rank owns: the full tensor under DDP,
the local shard under FSDP2 (so the EMA is sharded like the model and costs 1/world of its memory).
"""
from __future__ import annotations

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, params: dict[str, torch.Tensor], max_decay: float = 0.9999):
        self.max_decay = max_decay
        self.num_updates = 0
        self.shadow = {name: _local(p).detach().float().clone() for name, p in params.items()}

    @classmethod
    def of(cls, module: nn.Module, max_decay: float) -> "EMA":
        return cls(dict(module.named_parameters()), max_decay)

    def decay(self) -> float:
        return min(self.max_decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        self.num_updates += 1  # LitEma counts this update before computing its decay
        d = self.decay()
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        current = [_local(params[n]).detach().float() for n in names]
        torch._foreach_lerp_(shadows, current, 1.0 - d)  # s <- s + (1 - d)(p - s), one fused op

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "max_decay": self.max_decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            missing = set(self.shadow) - set(state["shadow"])
            extra = set(state["shadow"]) - set(self.shadow)
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(extra)[:5]}")
        self.num_updates = int(state["num_updates"])
        self.max_decay = float(state["max_decay"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
