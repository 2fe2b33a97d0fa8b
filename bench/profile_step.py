"""Where a training step's time goes: torch.profiler over a few steps, device time grouped by what the
kernel does (convolution, matmul, attention, compiled pointwise/norm, optimiser, copies, ...).

The 45% MFU goal needs to know which part runs far from peak; this is the table that says so.
Kernel names are the only information a profile gives about a kernel, so the grouping is by name
(cuDNN's fprop/dgrad/wgrad are convolutions, flash/fmha kernels attention, `triton_` kernels what
inductor generated: fused norms and pointwise ops). On CPU the same runs on aten op names.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins: attention kernels contain "gemm"-like words, cuDNN convolutions "implicit_gemm".
CATEGORIES = [
    ("copy / layout", re.compile(r"nchwToNhwc|nhwcToNchw", re.I)),  # cuDNN's own layout kernels
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn.*(mha|sdpa)", re.I)),
    ("convolution", re.compile(r"conv|fprop|dgrad|wgrad|winograd|implicit_gemm|mkldnn_convolution", re.I)),
    ("matmul", re.compile(r"gemm|matmul|cutlass|\bmm\b|addmm|bmm|aten::mm|aten::linear", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("compiled (triton)", re.compile(r"^triton_|^cpp_fused", re.I)),
    ("norm", re.compile(r"norm", re.I)),
    ("copy / layout", re.compile(r"copy|transpose|contiguous|\bcat\b|permute|to_copy|clone", re.I)),
    ("communication", re.compile(r"nccl|gloo|all_?reduce|all_?gather|reduce_?scatter", re.I)),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def profile_step(step: Callable[[], None], device: str, steps: int = 2) -> dict:
    """Runs `step` `steps` times under the profiler (the caller has warmed it up). Returns per-step
    milliseconds by category and the top kernels, from each event's self time on the device (CUDA) or
    on the CPU (aten ops)."""
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    by_cat: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us <= 0 or (cuda and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        if not cuda and not event.key.startswith("aten::"):
            continue  # CPU: aten ops only (python frames and profiler records would double count)
        by_cat[category(event.key)] += us / 1e3 / steps
        kernels.append((event.key, us / 1e3 / steps, event.count // steps))
    total = sum(by_cat.values())
    kernels.sort(key=lambda k: -k[1])
    return {"total_ms": total,
            "by_category": sorted(((c, ms, ms / total if total else 0.0) for c, ms in by_cat.items()),
                                  key=lambda row: -row[1]),
            "top": kernels[:15]}


def to_markdown(result: dict, title: str) -> str:
    lines = [f"### {title}", "", f"device time per step (sum of kernels): {result['total_ms']:.1f} ms", "",
             "| what | ms/step | share |", "|---|---|---|"]
    lines += [f"| {c} | {ms:.2f} | {100 * share:.1f}% |" for c, ms, share in result["by_category"]]
    lines += ["", "| kernel (top 15) | ms/step | calls/step |", "|---|---|---|"]
    lines += [f"| `{name[:90]}` | {ms:.2f} | {calls} |" for name, ms, calls in result["top"]]
    return "\n".join(lines) + "\n"
