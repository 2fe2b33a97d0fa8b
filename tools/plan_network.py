"""The network's share of a data-parallel step: the collectives' time at best, for the planner.

Every optimiser step moves the UNet's gradients, and under sharding its parameters, between all GPUs:
- DDP all-reduces the gradients: a reduce-scatter and an all-gather of G bytes (G = parameters x the
  reduce dtype's size, parallel.reduce_dtype);
- FSDP2 and ZeRO-2 reduce-scatter the gradients (G) and all-gather the updated parameters in the
  compute dtype (P) once; FSDP2 with parallel.reshard_after_forward=true and ZeRO-3 gather them
  again for the backward (2P).
Between nodes each such collective is a ring over the nodes' NICs (NCCL works inside each node over
NVLink first, then each of the node's GPUs rings its share across nodes), so each node sends
(N - 1) / N times the collective's bytes through its NICs, whatever the number of GPUs per node.
That time does not shrink with a faster GPU or a smaller per-GPU batch: SD's global batch of 2048 on
256 GPUs is 8 images per GPU per step, about 60 ms of A100 compute at 256 px, against ~133 ms to
all-reduce 3.4 GB of fp32 gradients through a p4de node's 400 Gbit/s.

The model is a floor: ideal link use, intra-node time ignored, and the step taken as
max(compute, collectives), i.e. all communication hidden behind compute.
"""
from __future__ import annotations

from functools import lru_cache

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Collective volume per step in units of (gradient bytes G, parameter bytes P).
BACKEND_VOLUME = {
    "ddp": (2, 0),           # all-reduce of the gradients
    "fsdp": (1, 1),          # reduce-scatter + one all-gather (parallel.reshard_after_forward=false)
    "fsdp-reshard": (1, 2),  # ... + the backward's all-gather (parallel.reshard_after_forward=true)
    "zero2": (1, 1),
    "zero3": (1, 2),
}


@lru_cache(maxsize=1)
def unet_parameter_count() -> int:
    """Trainable parameters of the SD v1 UNet (859.5M), counted on the meta device."""
    import torch

    from models.configs import UNetConfig
    from models.unet import UNetModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNetModel(UNetConfig()).parameters())


def bytes_per_step(backend: str = "ddp", reduce_dtype: str = "fp32", compute_dtype: str = "bf16",
                   parameters: int | None = None) -> float:
    """Bytes of the step's collectives (before the (N - 1) / N ring factor)."""
    grads, params = BACKEND_VOLUME[backend]
    n = parameters if parameters is not None else unet_parameter_count()
    return n * (grads * DTYPE_BYTES[reduce_dtype] + params * DTYPE_BYTES[compute_dtype])


def collective_seconds(nodes: int, node_gbps: float, backend: str = "ddp", reduce_dtype: str = "fp32",
                       compute_dtype: str = "bf16") -> float:
    """Seconds per optimiser step for the collectives across `nodes` nodes whose NICs carry `node_gbps`
    Gbit/s each way in all; 0 for one node or when `node_gbps` is 0 (not modelled)."""
    if nodes <= 1 or node_gbps <= 0:
        return 0.0
    return (nodes - 1) / nodes * bytes_per_step(backend, reduce_dtype, compute_dtype) / (node_gbps * 1e9 / 8)
