"""Training checkpoints: `checkpoints/step-N/` folders written atomically, the last K kept.

A checkpoint is a dict of stateful things, split by who owns them:
  step-N/engine/      model + optimiser + LR schedule, sharded by the backend (DCP or DeepSpeed)
  step-N/rank-R.pt    this rank's EMA tensors (shards under FSDP2), RNG states and loader position
  step-N/meta.json    step, samples seen, W&B run id, counters, world size, layout of the EMA

Resuming on another number of ranks: the engine's `load_resharded` reshards model and optimiser (DCP on
its own; DeepSpeed through its universal-checkpoint conversion), `SavedRanks.load_all` gives every old
rank's file, `whole_ema` puts the EMA pieces back together (the engine cuts them anew), and the loader
deals out what the old ranks had left of the data (data/plan.py, `replan`).
The folder is written as `step-N.tmp`, renamed when every rank has finished, and only then does
`latest` (a text file, replaced atomically) point at it: a crash mid-save leaves the previous
checkpoint as the latest valid one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from .disk_space import bytes_under, check_room, named_if_disk_full
from .distributed import StoppedByOtherRank, failed_ranks, on_rank_zero

LATEST = "latest"
STEP_FOLDER = re.compile(r"step-(\d+)")
# What reading a damaged file raises (DCP gathers every rank's into a CheckpointException, a BaseException).
READ_ERRORS = (OSError, RuntimeError, EOFError, pickle.UnpicklingError, CheckpointException)


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    wandb_run_id: str | None = None
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    last_loss: float | None = None
    extra: dict = field(default_factory=dict)


def _fsync(path: Path) -> None:
    """`path`'s data (a file) or entries (a folder) on the disk, not only in this node's page cache: a rename is
    written out on its own schedule, and after a crash or power loss it could point at data that never was."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (err.errno == errno.EINVAL and path.is_dir()):  # some file systems cannot sync a folder
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and folder under `root`. Rank 0 syncs what all ranks wrote (they have closed their files before
    the collective that tells every rank all parts are written): on a local disk that is the page cache they
    share; NFS clients write a file out when it is closed."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _replace_durably(src: Path, dst: Path) -> None:
    """os.replace, and the folder's new entry on the disk (what `src` holds must be synced before)."""
    os.replace(src, dst)
    _fsync(dst.parent)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    _replace_durably(tmp, path)


class CheckpointUnreadable(RuntimeError):
    """A checkpoint that cannot be resumed from: a file of it truncated or damaged, `latest` naming none."""


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint a start resumes from: the one `latest` names; without `latest`, the newest complete one
    (a crash between a save's rename and its `latest` leaves one, and deleting `latest` must not start the stage
    afresh over its checkpoints, which the new run's saves and pruning would delete); None when there is none."""
    marker = ckpt_dir / LATEST
    if not marker.is_file():
        complete = saved_steps(ckpt_dir) if ckpt_dir.is_dir() else {}
        return list(complete.values())[-1] if complete else None
    name = marker.read_text().strip()
    path = ckpt_dir / name
    if not name or not (path / "meta.json").is_file():
        raise CheckpointUnreadable(f"{marker} names {name!r}, which is not a complete checkpoint (no meta.json). "
                                   + _way_back(ckpt_dir, path if name else None))
    return path


def _way_back(ckpt_dir: Path, broken: Path | None) -> str:
    """What to do about a checkpoint that cannot be read: go back to the newest complete one before it."""
    step = STEP_FOLDER.fullmatch(broken.name) if broken is not None else None
    before = [p for n, p in saved_steps(ckpt_dir).items() if p != broken and (step is None or n < int(step[1]))]
    if not before:
        return (f"No other complete checkpoint is in {ckpt_dir}: to start the stage afresh, move that folder aside "
                "or give another run.dir")
    back = before[-1]
    aside = f"mv {broken} {ckpt_dir}/broken-{broken.name} && " if broken is not None and broken.is_dir() else ""
    which = "the newest complete checkpoint" + (" before it" if broken is not None else "")
    return f"To resume from {back.name}, {which}: {aside}echo {back.name} > {ckpt_dir / LATEST}"


def _unreadable(path: Path, what: str, err: BaseException) -> CheckpointUnreadable:
    return CheckpointUnreadable(f"cannot read {what} of checkpoint {path}: {type(err).__name__}: {err}\n"
                                f"If it is damaged (a truncated copy, a node that crashed before its writes reached "
                                f"the disk; not a checkpoint that a run still training pruned while it was read): "
                                f"{_way_back(path.parent, path)}")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resized_seed(seed: int, step: int, rank: int, stream: str) -> int:
    """The seed of one of a rank's random streams ("noise", "global") after a resume on another world size:
    the old ranks' streams have no counterpart, so each (run seed, step, rank, stream) begins a new one, the
    same however often it is resumed, and no two streams alike."""
    key = f"resized/{seed}/{step}/{rank}/{stream}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(ckpt_dir: Path, state: TrainState, engine, rank_state: dict, rank: int, world_size: int,
                    keep_last: int, keep_every: int = 0) -> Path:
    """Every rank calls this. Returns the final folder."""
    final = ckpt_dir / f"step-{state.step}"
    tmp = ckpt_dir / f"step-{state.step}.tmp"
    on_rank_zero(lambda: _make_room(ckpt_dir, tmp))
    try:
        engine.save(tmp / "engine")
        torch.save(rank_state, tmp / f"rank-{rank}.pt")
        error = None
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException; raised below, once all ranks know
        error = named_if_disk_full(err, ckpt_dir, f"checkpoint {final.name}", _after_no_room(ckpt_dir))
    # Also the barrier before rank 0 commits the folder: a rank whose part failed no longer leaves the others
    # waiting in it (on other nodes, for the process group's timeout).
    failed = failed_ranks(error)
    if failed:
        if rank == 0:  # an incomplete checkpoint: its room, for the run's status and logs
            shutil.rmtree(tmp, ignore_errors=True)
        first = min(failed)
        if rank != first:  # the first failed rank says why (DCP's failure is every rank's)
            raise StoppedByOtherRank(failed[first], first) from error
        raise error
    meta = {"step": state.step, "samples_seen": state.samples_seen, "wandb_run_id": state.wandb_run_id,
            "nonfinite_skipped": state.nonfinite_skipped, "nonfinite_in_a_row": state.nonfinite_in_a_row,
            "last_loss": state.last_loss, "world_size": world_size, "engine": engine.kind(),
            "ema_layout": engine.ema_layout, "extra": state.extra}
    on_rank_zero(lambda: _commit(ckpt_dir, tmp, final, meta, keep_last, keep_every))
    return final


def _commit(ckpt_dir: Path, tmp: Path, final: Path, meta: dict, keep_last: int, keep_every: int) -> None:
    """On rank 0, once every rank's part is written: meta.json, all of it on the disk, the rename, `latest`, and
    the pruning."""
    try:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_tree(tmp)  # on the disk before the rename makes it a checkpoint, and `latest` points at it
    except OSError as err:
        named = named_if_disk_full(err, ckpt_dir, f"checkpoint {final.name}", _after_no_room(ckpt_dir))
        shutil.rmtree(tmp, ignore_errors=True)
        raise named
    shutil.rmtree(final, ignore_errors=True)
    _replace_durably(tmp, final)
    _write_atomic(ckpt_dir / LATEST, final.name)
    _prune(ckpt_dir, keep_last, keep_every, meta["step"])


def _make_room(ckpt_dir: Path, tmp: Path) -> None:
    """Before a save: the folders of saves that never finished go (a crash or a full disk mid-save left them),
    and the disk must have room for one more checkpoint, as large as the newest one (the older ones are pruned
    only once it is complete); then the empty `tmp`."""
    for stale in ckpt_dir.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    previous = list(saved_steps(ckpt_dir).values())
    if previous:  # not a DeepSpeed universal conversion kept beside it (a resume on another world size wrote it)
        need = bytes_under(previous[-1], leave_out_suffix="-universal")
        check_room(ckpt_dir, need, f"checkpoint {tmp.name.removesuffix('.tmp')}", _after_no_room(ckpt_dir))
    tmp.mkdir(parents=True)


def _after_no_room(ckpt_dir: Path) -> str:
    """What a run stopped by a full disk leaves, and how to go on."""
    latest = ckpt_dir / LATEST
    before = (f"The checkpoints saved before are as they were: a restart resumes from {latest.read_text().strip()}, "
              "which `latest` names." if latest.is_file() else "No checkpoint was saved before it.")
    return (f"{before} Make room (keep fewer checkpoints: checkpoint.keep_last, checkpoint.keep_every; or move old "
            "ones away) and start the run again.")


def _step_folders(ckpt_dir: Path) -> dict[int, Path]:
    """The step-N folders in `ckpt_dir` by step, in order: not the .tmp ones of a save in progress, nor any other
    name (a folder an operator set aside as step-6.bad stopped every save after, in the pruning)."""
    found = {int(match[1]): p for p in ckpt_dir.glob("step-*")
             if (match := STEP_FOLDER.fullmatch(p.name)) and p.is_dir()}
    return dict(sorted(found.items()))


def saved_steps(ckpt_dir: Path) -> dict[int, Path]:
    """The complete checkpoints in `ckpt_dir` by step, in order."""
    return {step: p for step, p in _step_folders(ckpt_dir).items() if (p / "meta.json").is_file()}


def _prune(ckpt_dir: Path, keep_last: int, keep_every: int, saved_step: int) -> None:
    """All but the newest `keep_last` up to the one just saved, except the milestones (steps that are multiples of
    `keep_every`). Steps after it are left alone: they are what a run rolled back to an earlier checkpoint
    (`latest` set back) had trained before, and counted as the newest they had every new checkpoint deleted as soon
    as it was written, `latest` among them; the rolled-back run overwrites them as it reaches their steps."""
    upto = [(step, path) for step, path in _step_folders(ckpt_dir).items() if step <= saved_step]
    for step, path in upto[:-keep_last]:
        if not (keep_every and step % keep_every == 0):
            _delete_checkpoint(path)


def _delete_checkpoint(path: Path) -> None:
    """meta.json first, and on the disk, then the rest: a crash midway leaves a folder that is not a complete
    checkpoint, rather than one that says it is and lacks files (a start without `latest` would resume from it)."""
    (path / "meta.json").unlink(missing_ok=True)
    _fsync(path)
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class SavedRanks:
    """The per-rank files of a checkpoint (EMA, RNG states, loader position)."""
    path: Path
    world_size: int
    ema_layout: str  # Engine.ema_layout of the run that wrote them

    def load(self, rank: int, mmap: bool = False) -> dict:
        try:
            return torch.load(self.path / f"rank-{rank}.pt", map_location="cpu", weights_only=False, mmap=mmap)
        except READ_ERRORS as err:
            raise _unreadable(self.path, f"rank-{rank}.pt", err) from err

    def load_all(self) -> list[dict]:
        """Every rank's, memory-mapped: a tensor is read only when used (under DDP each file holds a
        whole EMA, of which one is needed)."""
        return [self.load(rank, mmap=True) for rank in range(self.world_size)]


class _WholeEMA(Mapping):
    """Full EMA tensors, each put together from the ranks' pieces when it is looked up."""

    def __init__(self, shadows: list[dict[str, torch.Tensor]], layout: str, shapes: dict[str, torch.Size]):
        if layout not in ("replicated", "dim0", "flat"):
            raise ValueError(f"cannot put together an EMA saved in layout {layout!r}")
        self.shadows, self.layout, self.shapes = shadows, layout, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.layout == "replicated":
            return self.shadows[0][name]
        whole = torch.cat([shadow[name] for shadow in self.shadows])
        if self.layout == "flat":  # equal slices of the flattened tensor, the last ones padded
            shape = self.shapes[name]
            whole = whole[:shape.numel()].view(shape)
        return whole

    def __iter__(self) -> Iterator[str]:
        return iter(self.shadows[0])

    def __len__(self) -> int:
        return len(self.shadows[0])


def whole_ema(shadows: list[dict[str, torch.Tensor]], layout: str,
              shapes: dict[str, torch.Size]) -> Mapping[str, torch.Tensor]:
    """The full EMA from every rank's saved shadow (rank order; `layout` is Engine.ema_layout of the run that
    saved them, `shapes` the full shapes), lazily: one tensor in memory at a time."""
    return _WholeEMA(shadows, layout, shapes)


def load_checkpoint(path: Path, engine, world_size: int) -> tuple[TrainState, SavedRanks]:
    """Loads model, optimiser and LR schedule into the engine (resharded if the world size changed) and
    returns the run's state and the checkpoint's per-rank files."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise _unreadable(path, "meta.json", err) from err
    saved = SavedRanks(path, meta["world_size"], meta.get("ema_layout", "unknown"))
    writer = meta.get("engine")
    if writer is not None and writer != engine.kind():
        raise RuntimeError(f"{path} was written by {writer}, this run is {engine.kind()}: a run resumes with the "
                           "backend (and ZeRO stage) it was written with. Set it back, or start a new stage from "
                           "its export (stage.init.from_checkpoint=<run.dir>/export).")
    if writer is None and saved.world_size != world_size:
        raise RuntimeError(f"{path} was written by {saved.world_size} ranks, this run has {world_size}, and it "
                           "predates resuming on another world size (its meta.json does not name its engine): "
                           f"resume with {saved.world_size} ranks")
    try:
        if saved.world_size == world_size:
            engine.load(path / "engine")
        else:
            engine.load_resharded(path / "engine")
    except READ_ERRORS as err:
        raise _unreadable(path, "engine/ (model, optimiser, LR schedule)", err) from err
    state = TrainState(step=meta["step"], samples_seen=meta["samples_seen"], wandb_run_id=meta["wandb_run_id"],
                       nonfinite_skipped=meta["nonfinite_skipped"], nonfinite_in_a_row=meta["nonfinite_in_a_row"],
                       last_loss=meta["last_loss"], extra=meta.get("extra", {}))
    return state, saved
