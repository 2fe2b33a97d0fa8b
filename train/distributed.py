"""Process-group set-up from torchrun / SLURM environment variables, and clean teardown."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_to_torchrun_env() -> None:
    """One task per GPU under srun (no torchrun): map SLURM's variables to what torch and DeepSpeed read.

    Without this DeepSpeed falls back to MPI discovery, which needs mpi4py."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(device_type: str, timeout_s: int = 1800, single_needs_group: bool = False) -> DistEnv:
    """Initialise the default process group (gloo on CPU, NCCL on CUDA) for more than one process. One
    process runs without, unless `single_needs_group` (FSDP2 shards over a mesh even of one rank: a run
    resumed on one GPU, say): it then gets a group of its own, with no rendezvous and no port."""
    _slurm_to_torchrun_env()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.device=cuda but no CUDA device is visible; use cluster=local (CPU) to "
                               "run on the CPU")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    elif world == 1 and single_needs_group and not dist.is_initialized():
        dist.init_process_group(backend, rank=0, world_size=1, store=dist.HashStore(),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistEnv(rank, world, local, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StoppedByOtherRank(Exception):
    """Raised on the ranks that did their part when another rank's failed (see `on_rank_zero`, `failed_ranks`);
    that rank says why. `kind`: the name of its exception's class."""

    def __init__(self, kind: str, rank: int):
        super().__init__(f"rank {rank} stopped ({kind})")
        self.kind, self.rank = kind, rank


def on_rank_zero(work) -> None:
    """`work()` on rank 0 alone, every rank learning whether it raised: rank 0 raises its error, the others
    StoppedByOtherRank. Otherwise they would wait in their next collective for a rank that had gone, and die
    of the broken connection with a traceback that hides the reason (or, on other nodes, wait out the process
    group's timeout). A collective itself: every rank calls it, and none goes on before rank 0 is done."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            work()
        except Exception as err:  # noqa: BLE001 - raised again below, once the other ranks know
            error = err
    kind = from_rank_zero(type(error).__name__ if error is not None else None)
    if error is not None:
        raise error
    if kind is not None:
        raise StoppedByOtherRank(kind, 0)


def failed_ranks(error: BaseException | None) -> dict[int, str]:
    """Every rank's part of a collective piece of work, told to all: {rank: its exception's class name} for the
    ranks whose part raised (`error`), so that the others stop too rather than wait for them in the next
    collective. A collective itself; without a process group, this rank's own."""
    mine = type(error).__name__ if error is not None else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    return {rank: kind for rank, kind in enumerate(every) if kind is not None}


def from_rank_zero(value):
    """Rank 0's `value` (any picklable object) on every rank; `value` itself without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In place (a no-op without a process group); on NCCL the collective is queued on the stream like
    a kernel, so the host does not wait for it."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def shutdown(exit_code: int) -> None:
    """Leave without the sporadic SIGABRT at interpreter exit seen with gloo (FIELD_NOTES): destroy the
    group, flush, and exit immediately."""
    import sys

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone must not change the exit code
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
