"""The device a command was asked to run on, checked before any model is built or weights are read."""
from __future__ import annotations

import torch


def usable_device(text: str) -> torch.device:
    """torch.device(text), or a ValueError that says what this machine has: a misspelt device, CUDA
    without a visible GPU or a GPU index past the last would otherwise fail deep inside the first .to()."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"device {text!r}: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {text!r}: no CUDA device is visible here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {text!r}: this process sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise ValueError(f"device {text!r}: this command runs on cpu or cuda")
    return device
