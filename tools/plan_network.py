"""The network's share of a data-parallel step: the gradient reduction's time at best, for the planner.

Every optimiser step reduces the UNet's gradients across all GPUs (DDP: one all-reduce; FSDP2: a
reduce-scatter of the gradients plus all-gathers of the bf16 parameters, the same volume). Between
nodes the reduction is a ring over the nodes' NICs (NCCL reduces inside each node over NVLink first,
then each of the node's GPUs rings 1/8 of the buffer across nodes), so each node sends and receives
2 (N - 1) / N times the gradient bytes through its NICs per step, whatever the number of GPUs per node.
That time does not shrink with a faster GPU or a smaller per-GPU batch: SD's global batch of 2048 on
256 GPUs is 8 images per GPU per step, about 60 ms of A100 compute at 256 px, against ~130 ms to
all-reduce 3.4 GB of fp32 gradients through a p4de node's 400 Gbit/s.

The model is a floor: ideal link use, intra-node time ignored, and the step taken as
max(compute, reduction), i.e. all communication hidden behind compute (DDP can hide it behind the
backward pass only).
"""
from __future__ import annotations

from functools import lru_cache

REDUCE_BYTES = {"fp32": 4, "bf16": 2}


@lru_cache(maxsize=1)
def unet_parameter_count() -> int:
    """Trainable parameters of the SD v1 UNet (859.5M), counted on the meta device."""
    import torch

    from models.configs import UNetConfig
    from models.unet import UNetModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNetModel(UNetConfig()).parameters())


def gradient_reduction_seconds(nodes: int, node_gbps: float, reduce_dtype: str = "fp32",
                               parameters: int | None = None) -> float:
    """Seconds per optimiser step to reduce the gradients across `nodes` nodes whose NICs carry
    `node_gbps` Gbit/s each way in all; 0 for one node or when `node_gbps` is 0 (not modelled)."""
    if nodes <= 1 or node_gbps <= 0:
        return 0.0
    grad_bytes = (parameters if parameters is not None else unet_parameter_count()) * REDUCE_BYTES[reduce_dtype]
    return 2.0 * (nodes - 1) / nodes * grad_bytes / (node_gbps * 1e9 / 8)
