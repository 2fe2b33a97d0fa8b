"""Training checkpoints: `checkpoints/step-N/` folders written atomically, the last K kept.

A checkpoint is a dict of stateful things, split by who owns them:
  step-N/engine/      model + optimiser + LR schedule, sharded by the backend (DCP or DeepSpeed)
  step-N/rank-R.pt    this rank's EMA tensors (shards under FSDP2), RNG states and loader position
  step-N/meta.json    step, samples seen, W&B run id, counters, world size, layout of the EMA
The folder is written as `step-N.tmp`, renamed when every rank has finished, and only then does
`latest` (a text file, replaced atomically) point at it: a crash mid-save leaves the previous
checkpoint as the latest valid one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .distributed import barrier

LATEST = "latest"


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    wandb_run_id: str | None = None
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    last_loss: float | None = None
    extra: dict = field(default_factory=dict)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    marker = ckpt_dir / LATEST
    if not marker.is_file():
        return None
    path = ckpt_dir / marker.read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{marker} points at {path}, which is not a complete checkpoint")
    return path


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, state: TrainState, engine, rank_state: dict, rank: int, world_size: int,
                    keep_last: int) -> Path:
    """Every rank calls this. Returns the final folder."""
    final = ckpt_dir / f"step-{state.step}"
    tmp = ckpt_dir / f"step-{state.step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp / "engine")
    torch.save(rank_state, tmp / f"rank-{rank}.pt")
    barrier()
    if rank == 0:
        meta = {"step": state.step, "samples_seen": state.samples_seen, "wandb_run_id": state.wandb_run_id,
                "nonfinite_skipped": state.nonfinite_skipped, "nonfinite_in_a_row": state.nonfinite_in_a_row,
                "last_loss": state.last_loss, "world_size": world_size, "extra": state.extra}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(ckpt_dir / LATEST, final.name)
        _prune(ckpt_dir, keep_last)
    barrier()
    return final


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("step-*")
                   if p.is_dir() and not p.name.endswith(".tmp"))
    for _, path in steps[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in ckpt_dir.glob("step-*.tmp"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, engine, rank: int, world_size: int) -> tuple[TrainState, dict]:
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world_size:
        raise RuntimeError(
            f"{path} was written by {meta['world_size']} ranks, this run has {world_size}. The EMA shards and the "
            "loader position are per rank: resume with the same world size, or start a new stage from its "
            "export (stage.init.from_checkpoint=<run.dir>/export).")
    engine.load(path / "engine")
    rank_state = torch.load(path / f"rank-{rank}.pt", map_location="cpu", weights_only=False)
    state = TrainState(step=meta["step"], samples_seen=meta["samples_seen"], wandb_run_id=meta["wandb_run_id"],
                       nonfinite_skipped=meta["nonfinite_skipped"], nonfinite_in_a_row=meta["nonfinite_in_a_row"],
                       last_loss=meta["last_loss"], extra=meta.get("extra", {}))
    return state, rank_state
