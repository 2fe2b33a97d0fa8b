"""Exponential moving average of the UNet, LitEma's rule: decay = min(max_decay, (1 + n) / (10 + n)),
n = the number of updates so far.

The EMA holds one fp32 tensor per parameter of whatever this rank owns: the full tensor under DDP,
the local shard under FSDP2 (so the EMA is sharded like the model and costs 1/world of its memory).
The update count lives on the device with the shadow: a skipped optimiser step (decided on the
device) leaves average and count unchanged without the host ever reading the decision.
"""
from __future__ import annotations

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, params: dict[str, torch.Tensor], max_decay: float = 0.9999):
        self.max_decay = max_decay
        self.shadow = {name: _local(p).detach().float().clone() for name, p in params.items()}
        device = next(iter(self.shadow.values())).device if self.shadow else torch.device("cpu")
        # float64 counts exactly far beyond any run's length and gives the decay in double, as LitEma's
        # python arithmetic does.
        self._count = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def num_updates(self) -> int:
        """Reads the device (a sync): for checkpoints and exports, not for the step."""
        return int(self._count.item())

    @classmethod
    def of(cls, module: nn.Module, max_decay: float) -> "EMA":
        return cls(dict(module.named_parameters()), max_decay)

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], skipped: torch.Tensor | None = None) -> None:
        """One EMA step; `skipped` (a 0/1 tensor on the device) = 1 makes it a no-op."""
        take = 1.0 if skipped is None else 1.0 - skipped.to(self._count)
        self._count += take  # LitEma counts this update before computing its decay
        decay = torch.clamp((1 + self._count) / (10 + self._count), max=self.max_decay)
        weight = ((1.0 - decay) * take).float()
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        current = [_local(params[n]).detach().float() for n in names]
        # s <- s + w (p - s). The weight stays a device tensor (the Scalar overload would read it on the
        # host); weight 0 leaves s bit-identical.
        torch._foreach_lerp_(shadows, current, [weight] * len(shadows))

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Writes the average into `params` (this rank's tensors, as `update` takes them; cast to their
        dtype) and returns what they held, for `restore`. Costs one copy of this rank's weights."""
        saved = {}
        for name, shadow in self.shadow.items():
            target = _local(params[name])
            saved[name] = target.clone()
            target.copy_(shadow)
        return saved

    @staticmethod
    @torch.no_grad()
    def restore(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
        """Puts back, bit for bit, what `copy_to` took out."""
        for name, value in saved.items():
            _local(params[name]).copy_(value)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "max_decay": self.max_decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            missing = set(self.shadow) - set(state["shadow"])
            extra = set(state["shadow"]) - set(self.shadow)
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(extra)[:5]}")
        self._count.fill_(int(state["num_updates"]))
        self.max_decay = float(state["max_decay"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
