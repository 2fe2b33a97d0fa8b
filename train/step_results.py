"""What each optimiser step tells the host, kept on the device until the host reads it a step later.

The loop never waits for the step it has just queued: the skip decision is taken on the device (fused
AdamW's `found_inf`, a masked EMA), the counters and the loss window are device tensors, and the host
learns a step's outcome from a `DeferredRead` it opens one step later (see train/deferred.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from train.deferred import DeferredRead
from train.distributed import all_reduce_sum_


@dataclass
class StepOutcome:
    """One optimiser step's results, as device tensors (0-dim)."""

    loss: torch.Tensor  # this rank's mean over its micro-batches
    skipped: torch.Tensor  # 1.0: no update (a rank's loss or the gradient norm was not finite)
    grad_norm: torch.Tensor
    preempted: torch.Tensor  # 1.0: some rank has received the pre-emption signal


def vote(local_loss: torch.Tensor, preempt_requested: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(any rank's loss non-finite, any rank signalled) as 0/1 device tensors, from one collective.

    Every rank must take the same skip decision, or the ranks' optimiser states diverge; and all must
    stop at the same step. `torch.full` writes the host's flag with a kernel argument, not a copy."""
    flags = torch.stack([(~torch.isfinite(local_loss)).float(),
                         torch.full((), float(preempt_requested), device=local_loss.device)])
    all_reduce_sum_(flags)
    return (flags[0] > 0).float(), (flags[1] > 0).float()


@dataclass
class PendingStep:
    """A step whose results are on their way to the host."""

    index: int  # the step's number (0-based: the global step before it ran)
    read: DeferredRead
    lr: float  # the LR the step used (host-side already)
    # The meter's clock when the step had finished, where the host knows it without a read (the CPU runs
    # a step synchronously); None: the read's return says it (CUDA).
    done_at: float | None = None


@dataclass
class StepCounters:
    """Device-side running state; seeded from the checkpointed host counters."""

    device: torch.device
    skipped_total: int = 0
    in_a_row: int = 0
    _t: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self):
        zeros = lambda v=0.0: torch.full((), float(v), dtype=torch.float64, device=self.device)  # noqa: E731
        self._t = {"skipped_total": zeros(self.skipped_total), "in_a_row": zeros(self.in_a_row),
                   "window_sum": zeros(), "window_count": zeros()}

    def record(self, index: int, outcome: StepOutcome, lr: float, close_window: bool, world_size: int) -> PendingStep:
        """Fold one step into the counters and start its deferred read; `close_window` adds the log
        window's mean loss over the ranks (skipped steps excluded) and the step's grad norm."""
        t, skipped = self._t, outcome.skipped.to(torch.float64)
        t["in_a_row"].add_(1).mul_(skipped)
        t["skipped_total"].add_(skipped)
        t["window_sum"].add_(torch.where(skipped > 0, 0.0, outcome.loss.to(torch.float64)))
        t["window_count"].add_(1 - skipped)
        names = ["skipped", "preempted", "in_a_row", "skipped_total"]
        values = [skipped, outcome.preempted, t["in_a_row"], t["skipped_total"]]
        if close_window:
            # The count is equal on every rank (skips are collective), so the mean of the ranks' means
            # is the mean over all ranks' steps.
            mean = t["window_sum"] / t["window_count"].clamp(min=1)
            names += ["loss", "window_count", "grad_norm"]
            values += [all_reduce_sum_(mean) / world_size, t["window_count"], outcome.grad_norm]
        read = DeferredRead(names, values)  # snapshots the values before the resets below
        if close_window:
            t["window_sum"].zero_()
            t["window_count"].zero_()
        return PendingStep(index, read, lr)
