"""Strict key checking shared by every adapter: a mismatch is an error that lists the keys."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


class KeyMismatchError(KeyError):
    """Raised when a state dict does not hold exactly the keys (and shapes) a model needs."""

    def __str__(self) -> str:  # KeyError would repr() the message and hide the newlines
        return str(self.args[0])


def _listing(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n    {shown}{more}"


def check_keys(expected: Iterable[str], got: Iterable[str], what: str) -> None:
    expected, got = set(expected), set(got)
    missing, unexpected = expected - got, got - expected
    if missing or unexpected:
        parts = [f"{what}: state dict does not match the model"]
        if missing:
            parts.append(f"  {len(missing)} missing:{_listing(missing)}")
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected:{_listing(unexpected)}")
        raise KeyMismatchError("\n".join(parts))


def check_shapes(expected: Mapping[str, torch.Size | tuple], got: Mapping[str, torch.Tensor], what: str) -> None:
    check_keys(expected.keys(), got.keys(), what)
    bad = [f"{k}: expected {tuple(expected[k])}, got {tuple(got[k].shape)}" for k in expected
           if tuple(expected[k]) != tuple(got[k].shape)]
    if bad:
        raise KeyMismatchError(f"{what}: {len(bad)} shape mismatches:{_listing(bad)}")


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with our error message listing every missing/unexpected key."""
    check_shapes({k: v.shape for k, v in module.state_dict().items()}, state, what)
    module.load_state_dict(state, strict=True)
