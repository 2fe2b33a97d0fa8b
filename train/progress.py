"""Console output of rank 0: a tqdm bar on a terminal, one plain line per log step everywhere else.

Under Slurm or a pipe stdout is a file, where a bar's carriage returns turn into megabytes of partial
lines; there (or with tracking.progress_bar=false) each log step prints one self-contained line.
The bar writes to stdout (tqdm's default is stderr) so that both modes go to the same stream.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from tqdm import tqdm

from train.config import TrackingConfig
from train.meters import to_scalar


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _metric_parts(loss: float | None, lr: float | None, img_per_s: float | None) -> list[str]:
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if img_per_s is not None:
        parts.append(f"img/s {img_per_s:,.1f}")
    return parts


def format_line(step: int, total: int, *, loss: float | None = None, lr: float | None = None,
                img_per_s: float | None = None, elapsed_s: float | None = None,
                eta_s: float | None = None) -> str:
    """One log line, e.g. `step 120/1,000 (12.0%) | loss 0.1234 | lr 1.00e-04 | img/s 512.0 | ...`."""
    width = len(f"{total:,}")
    pct = 100.0 * step / total if total else 0.0
    parts = [f"step {step:>{width},}/{total:,} ({pct:5.1f}%)"]
    parts += _metric_parts(loss, lr, img_per_s)
    if elapsed_s is not None:
        parts.append(f"elapsed {format_duration(elapsed_s)}")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


class Progress:
    """Rank 0's step counter. `step()` every optimiser step (cheap), `log()` on log steps."""

    def __init__(self, cfg: TrackingConfig, total_steps: int, start_step: int = 0, rank: int = 0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.enabled = rank == 0
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._started = clock()
        self._bar: tqdm | None = None
        if self.enabled and cfg.progress_bar and _is_tty(self._stream):
            self._bar = tqdm(total=total_steps, initial=start_step, file=self._stream, unit="step",
                             dynamic_ncols=True, smoothing=0.05)

    @property
    def uses_bar(self) -> bool:
        return self._bar is not None

    def step(self, step: int) -> None:
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def log(self, step: int, *, loss: Any = None, lr: Any = None, img_per_s: Any = None) -> None:
        """Show the log step's numbers (python floats or 0-d tensors: this is a log step, syncing is fine)."""
        if not self.enabled:
            return
        loss, lr, img_per_s = (None if v is None else float(to_scalar(v)) for v in (loss, lr, img_per_s))
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(_metric_parts(loss, lr, img_per_s)), refresh=False)
            self.step(step)
            self._bar.refresh()
            return
        elapsed = self._clock() - self._started
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else None
        print(format_line(step, self.total, loss=loss, lr=lr, img_per_s=img_per_s,
                          elapsed_s=elapsed, eta_s=eta), file=self._stream, flush=True)

    def write(self, message: str) -> None:
        """Print a message without tearing the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# Rows of the end-of-run table, in order: summary key -> label. Other keys follow under their own name.
_SUMMARY_ROWS = {
    "steps": "steps",
    "samples_seen": "samples seen",
    "final_loss": "final loss",
    "mean_img_per_s": "mean img/s",
    "wall_time_s": "wall time",
    "skipped_updates": "skipped updates",
    "skipped_samples": "skipped samples",
    "checkpoint": "checkpoint",
}


def _format_value(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "wall_time_s":
        return format_duration(float(value))
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key == "mean_img_per_s":
            return f"{value:,.1f}"
        return f"{value:.4f}" if key == "final_loss" else f"{value:.6g}"
    return str(value)


def format_summary(values: dict[str, Any]) -> str:
    """The table printed at the end of a run.

    Known keys: steps, samples_seen, final_loss, mean_img_per_s, wall_time_s, skipped_updates,
    skipped_samples ({reason: count}, shown as a total and one row per reason), checkpoint.
    Missing known keys are left out; unknown keys are shown after them.
    """
    keys = [k for k in _SUMMARY_ROWS if k in values] + [k for k in values if k not in _SUMMARY_ROWS]
    rows: list[tuple[str, str]] = []
    for key in keys:
        value = values[key]
        label = _SUMMARY_ROWS.get(key, key)
        if isinstance(value, dict):
            counts = {reason: int(to_scalar(n)) for reason, n in value.items()}
            rows.append((label, f"{sum(counts.values()):,}"))
            rows += [(f"  {reason}", f"{n:,}") for reason, n in sorted(counts.items())]
        else:
            if not isinstance(value, (str, type(None))) and not hasattr(value, "__fspath__"):
                value = to_scalar(value)
            rows.append((label, _format_value(key, value)))
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(["run summary"] + [f"  {label:<{width}}  {text}" for label, text in rows])
