"""Throughput per log window: images/s, TFLOP/s, MFU and the share of time spent waiting for data.

The meter only reads a host clock; it never touches the device. A window must end when its last step
has finished: on CUDA the caller reads that step's results first (which waits for it); on the CPU,
where a step has finished when its call returns, the caller notes that time and passes it
(`window(at=...)`), since the trainer reads a step's results one step late.
"""
from __future__ import annotations

import contextlib
import numbers
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch


def to_scalar(value: Any) -> float | int | bool:
    """A python number from a float/int/bool, a numpy scalar or a one-element tensor.

    `.item()` on a CUDA tensor waits for the device, so call this only on log steps.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar tensor, got shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, (np.number, np.bool_)):
        return value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"expected a number or a scalar tensor, got {type(value).__name__}")


class ThroughputMeter:
    """Accumulates one log window; `window()` reports it and starts the next.

    images/s counts all ranks: world_size x the local images of this rank (data parallel ranks run the
    same micro-batch size, so the local count stands for every rank).
    """

    def __init__(self, world_size: int, flops_per_image: float | None, peak_tflops: float | None,
                 clock: Callable[[], float] = time.perf_counter, encoder_flops_per_image: float = 0.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size}")
        self.world_size = world_size
        # The UNet's forward + backward: the model's FLOPs, what MFU is of. The frozen encoders' forward,
        # where they run in the loop, is reported beside it (`*_with_encoders`): work the GPU does too.
        self.flops_per_image = flops_per_image
        self.encoder_flops_per_image = encoder_flops_per_image
        # Per-GPU dense peak; None (CPU, unknown GPU) means MFU is omitted rather than invented.
        self.peak_tflops = peak_tflops
        self._clock = clock
        self._wait_started: float | None = None
        self.reset()

    def reset(self) -> None:
        """Start a fresh window now (e.g. at the first step, so start-up time is not counted)."""
        self._window_start = self._clock()
        self._images = 0
        # (start, end) of the data waits and the pauses: a window that closes at a time before now (a step
        # that ended earlier, see window()) takes only their parts before it.
        self._waits: list[tuple[float, float]] = []
        self._pauses: list[tuple[float, float]] = []

    def now(self) -> float:
        return self._clock()

    def data_wait_start(self) -> None:
        self._wait_started = self._clock()

    def data_wait_end(self) -> None:
        if self._wait_started is None:
            raise RuntimeError("data_wait_end() without data_wait_start()")
        self._waits.append((self._wait_started, self._clock()))
        self._wait_started = None

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        self.data_wait_start()
        try:
            yield
        finally:
            self.data_wait_end()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work between steps that is not training (validation, sample grids, checkpoint saves): its time is
        left out of the window it falls in, so img/s and MFU stay those of the steps."""
        started = self._clock()
        try:
            yield
        finally:
            self._pauses.append((started, self._clock()))

    def step_done(self, local_images: int) -> None:
        self._images += local_images

    def window(self, at: float | None = None) -> dict[str, float]:
        """Rates over the time since the last window (or reset) up to `at` (default now: the clock's time
        when the caller knows the window's last step has finished); resets. Empty if no time passed."""
        now = self._clock() if at is None else at
        start = self._window_start
        elapsed = now - start - _overlap(self._pauses, start, now)
        images, wait_s = self._images, _overlap(self._waits, start, now)
        if self._wait_started is not None and self._wait_started < now:
            # A wait spanning the window boundary: its first part belongs to this window.
            wait_s += now - max(self._wait_started, start)
        self._window_start, self._images = now, 0
        self._waits, self._pauses = _after(self._waits, now), _after(self._pauses, now)
        if elapsed <= 0:
            return {}
        per_gpu = images / elapsed
        out = {
            "throughput/img_per_s": per_gpu * self.world_size,
            "throughput/img_per_s_per_gpu": per_gpu,
            "throughput/data_wait_frac": wait_s / elapsed,
        }
        if self.flops_per_image is not None:
            rates = {"": self.flops_per_image}
            if self.encoder_flops_per_image:
                rates["_with_encoders"] = self.flops_per_image + self.encoder_flops_per_image
            for suffix, flops in rates.items():
                tflops = per_gpu * flops / 1e12
                out[f"throughput/tflops_per_gpu{suffix}"] = tflops
                if self.peak_tflops:
                    out[f"throughput/mfu{suffix}"] = tflops / self.peak_tflops
        return out


def _overlap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)


def _after(intervals: list[tuple[float, float]], t: float) -> list[tuple[float, float]]:
    """The parts of `intervals` after t."""
    return [(max(a, t), b) for a, b in intervals if b > t]
