"""A full disk stops a save with what it needs and has, before writing where it can tell (and by name where it
cannot), and the checkpoints saved before stay as they were. The disk here is simulated: a fixed capacity less
what the folder holds, with the engine's files sparse (large by their size, nothing on the real disk)."""
from __future__ import annotations

import errno
import os
from collections import namedtuple

import pytest

from train import checkpoint as ckpt
from train import disk_space
from train.disk_space import DiskFull, bytes_under
from train_helpers import in_process_trainer

MB = 10**6
Usage = namedtuple("Usage", "total used free")


class _SparseEngine:
    """Writes one engine file of `size` bytes (sparse), or fails as a full disk made torch.save fail in CI."""
    ema_layout = "replicated"

    def __init__(self, size: int, fail: bool = False):
        self.size, self.fail = size, fail

    def save(self, path):
        path.mkdir(exist_ok=True)  # ranks in processes of their own share it
        with open(path / f"__{os.getpid()}.distcp", "wb") as f:
            f.truncate(self.size)
        if self.fail:
            raise RuntimeError("basic_ios::clear: iostream error")

    def kind(self) -> str:
        return "SparseEngine"


def _disk(monkeypatch, root, capacity: int):
    """`root`'s file system as one of `capacity` bytes holding what is under `root`."""
    def usage(path):
        used = bytes_under(root)
        return Usage(capacity, used, max(capacity - used, 0))

    monkeypatch.setattr(disk_space.shutil, "disk_usage", usage)


def _save(ckpt_dir, step, engine, keep_last=2):
    return ckpt.save_checkpoint(ckpt_dir, ckpt.TrainState(step=step), engine, {}, rank=0, world_size=1,
                                keep_last=keep_last)


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch):
    _disk(monkeypatch, tmp_path, capacity=500 * MB)
    _save(tmp_path, 3, _SparseEngine(300 * MB))
    with pytest.raises(DiskFull) as err:
        _save(tmp_path, 6, _SparseEngine(300 * MB))
    message = str(err.value.strerror)
    assert "no room for checkpoint step-6: it needs about 0.30 GB" in message and "has 0.20 GB free" in message
    assert "a restart resumes from step-3" in message and "checkpoint.keep_last" in message
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-3"]  # nothing of step-6
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-3"


def test_a_checkpoint_is_sized_without_a_universal_conversion_beside_it(tmp_path, monkeypatch):
    """A DeepSpeed resume on another world size keeps `engine/<tag>-universal` (as large again) in the checkpoint it
    read: the next checkpoint is written without one."""
    _disk(monkeypatch, tmp_path, capacity=1000 * MB)
    _save(tmp_path, 3, _SparseEngine(300 * MB))
    universal = tmp_path / "step-3" / "engine" / "global_step3-universal" / "zero"
    universal.mkdir(parents=True)
    with open(universal / "exp_avg.pt", "wb") as f:
        f.truncate(300 * MB)
    _save(tmp_path, 6, _SparseEngine(300 * MB))  # 400 MB free: room for 300, not for 600
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-6"


def test_a_save_makes_room_by_removing_saves_that_never_finished(tmp_path, monkeypatch):
    """A step-N.tmp left by a crash or a full disk mid-save held its room until after the next save."""
    _disk(monkeypatch, tmp_path, capacity=800 * MB)
    _save(tmp_path, 3, _SparseEngine(300 * MB))
    stale = tmp_path / "step-9.tmp"
    stale.mkdir()
    with open(stale / "__0_0.distcp", "wb") as f:
        f.truncate(300 * MB)
    _save(tmp_path, 6, _SparseEngine(300 * MB), keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-6"]


def test_a_save_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch):
    _disk(monkeypatch, tmp_path, capacity=700 * MB)
    _save(tmp_path, 3, _SparseEngine(300 * MB))
    # The check passes (400 MB free for 300); the write fails anyway, as if another writer had filled the disk.
    with pytest.raises(DiskFull) as err:
        _save(tmp_path, 6, _SparseEngine(399 * MB, fail=True))
    message = err.value.strerror
    assert "writing checkpoint step-6 into" in message and "failed with its disk full (1.0 MB free" in message
    assert "RuntimeError: basic_ios::clear: iostream error" in message and "resumes from step-3" in message
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-3"


def test_a_failed_write_with_room_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    _disk(monkeypatch, tmp_path, capacity=10**12)
    with pytest.raises(RuntimeError, match="iostream error") as err:
        _save(tmp_path, 3, _SparseEngine(MB, fail=True))
    assert not isinstance(err.value, DiskFull)


def test_an_export_the_disk_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch, two_shards):
    """The CI failure of 2026-12-04: the stage's export (after its last checkpoint) on a full disk ended in
    torch.save's "unexpected pos 71512384 vs 71512272"."""
    from train.export import export_stage

    trainer = in_process_trainer(tmp_path, two_shards, "backend=ddp", "parallel.precision=fp32")
    run_dir = tmp_path / "run"
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 5 * MB, 5 * MB))
    with pytest.raises(DiskFull, match=r"no room for the export .*/run/export/model.ckpt: it needs about \d+\.\d MB "
                                       r"and the disk of .* has 5.0 MB free.*start the run again with the same "
                                       r"settings; it resumes at its last step and writes the export"):
        export_stage(trainer, run_dir / "export")
    assert not (run_dir / "export").exists() and not (run_dir / "export.tmp").exists()
    monkeypatch.undo()
    assert export_stage(trainer, run_dir / "export").is_file()  # with room, as before


def _save_as_rank(rank: int, store: str, ckpt_dir: str, out: str) -> None:
    """One of two gloo ranks saving step 3; rank 1's own part fails (its engine files written, then the error)."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        ckpt.save_checkpoint(Path(ckpt_dir), ckpt.TrainState(step=3), _SparseEngine(MB, fail=rank == 1), {},
                             rank=rank, world_size=2, keep_last=2)
        outcome = {"saved": True}
    except Exception as err:  # noqa: BLE001 - what each rank raised is the result
        outcome = {"raised": type(err).__name__, "message": str(err)}
    finally:
        dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(outcome))


def test_a_rank_whose_part_of_a_save_fails_stops_every_rank(tmp_path):
    """Rank 0 used to wait for rank 1 in the barrier after the writes until torchrun's agent killed it (on other
    nodes, until the process group's 30-minute timeout). Now rank 1 raises its own error, rank 0 stops naming it,
    and the incomplete checkpoint is gone."""
    import json
    import multiprocessing

    ckpt_dir = tmp_path / "checkpoints"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_save_as_rank, args=(r, str(tmp_path / "store"), str(ckpt_dir), str(tmp_path / "out")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    hung = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert hung == [False, False]
    outcome = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert outcome[1] == {"raised": "RuntimeError", "message": "basic_ios::clear: iostream error"}  # room left
    assert outcome[0] == {"raised": "StoppedByOtherRank", "message": "rank 1 stopped (RuntimeError)"}
    assert sorted(p.name for p in ckpt_dir.iterdir()) == []
