"""Reading step results on the host without stalling the device.

`.item()`, `float(t)` or `bool(t)` on a CUDA tensor waits until every kernel queued so far has run:
the host stops enqueuing, the device's queue drains, and the next step starts from an empty queue.
A `DeferredRead` instead copies a few numbers into pinned host memory on the stream and records an
event; the loop reads them one step later, when the device has long finished them and the next step
is already queued, so the wait returns at once. Every rank reads at the same step (the caller decides
when), so decisions taken from the values (skip, pre-empt, abort) stay collective.
"""
from __future__ import annotations

import torch


class DeferredRead:
    def __init__(self, names: list[str], values: list[torch.Tensor]):
        if len(names) != len(values):
            raise ValueError(f"{len(names)} names for {len(values)} values")
        self.names = names
        packed = torch.stack([v.detach().reshape(()).to(torch.float64) for v in values])
        if packed.device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            # Already on the host; a copy, so counters updated in place later do not change this snapshot.
            self._host = packed.clone()
            self._ready = None

    def result(self) -> dict[str, float]:
        """The values as they were when the step that produced them finished (waits for that, if needed)."""
        if self._ready is not None:
            self._ready.synchronize()
        return dict(zip(self.names, self._host.tolist()))
