"""A run folder whose checkpoints are not as the last save left them: `latest` gone or naming nothing, a file of
the latest checkpoint truncated. A start resumes from the newest complete checkpoint or stops naming the file and
the command that goes back to the one before; it never starts the stage afresh over its checkpoints."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from train import checkpoint as ckpt
from train_helpers import in_process_trainer


def _fake_step(ckpt_dir, step, complete=True):
    (ckpt_dir / f"step-{step}").mkdir(parents=True)
    if complete:
        (ckpt_dir / f"step-{step}" / "meta.json").write_text("{}")


def test_without_latest_the_newest_complete_checkpoint_is_resumed(tmp_path):
    """A crash between a save's rename and its `latest`, or `latest` deleted: the start resumed nothing, and its
    own saves then deleted the checkpoints (step-3 overwritten, the older ones pruned)."""
    assert ckpt.latest_checkpoint(tmp_path / "none") is None and ckpt.latest_checkpoint(tmp_path) is None
    for step in (3, 6):
        _fake_step(tmp_path, step)
    _fake_step(tmp_path, 9, complete=False)
    (tmp_path / "step-12.tmp").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-6"


@pytest.mark.parametrize("content", ["", "step-9", "step-"])
def test_latest_naming_no_checkpoint_says_which_to_name(tmp_path, content):
    for step in (3, 6):
        _fake_step(tmp_path, step)
    (tmp_path / "latest").write_text(content)
    with pytest.raises(ckpt.CheckpointUnreadable, match=rf"names '{content}', which is not a complete checkpoint.*"
                                                        rf"echo step-6 > {tmp_path}/latest"):
        ckpt.latest_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, two_shards):
    """A one-rank DDP run folder with complete checkpoints at steps 3 and 6 (`latest` step-6)."""
    tmp = tmp_path_factory.mktemp("saved")
    trainer = in_process_trainer(tmp, two_shards, "backend=ddp", "parallel.precision=fp32")
    for step in (3, 6):
        trainer.state.step = step
        trainer.save()
    return tmp / "run"


@pytest.mark.parametrize("damaged", ["meta.json", "rank-0.pt", "engine/__0_0.distcp"])
def test_a_truncated_file_stops_the_resume_naming_it_and_the_way_back(tmp_path, two_shards, saved_run, damaged):
    shutil.copytree(saved_run, tmp_path / "run")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    path = ckpt_dir / "step-6" / damaged
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointUnreadable) as err:
        in_process_trainer(tmp_path, two_shards, "backend=ddp", "parallel.precision=fp32")
    message = str(err.value)
    assert f"of checkpoint {ckpt_dir}/step-6" in message and damaged.split("/")[0] in message
    back = f"mv {ckpt_dir}/step-6 {ckpt_dir}/broken-step-6 && echo step-3 > {ckpt_dir}/latest"
    assert back in message

    # Doing what it says resumes from step-3.
    (ckpt_dir / "step-6").rename(ckpt_dir / "broken-step-6")
    (ckpt_dir / "latest").write_text("step-3")
    resumed = in_process_trainer(tmp_path, two_shards, "backend=ddp", "parallel.precision=fp32")
    assert resumed.state.step == 3 and json.loads((ckpt_dir / "step-3" / "meta.json").read_text())["step"] == 3


class _FolderEngine:
    """What save_checkpoint needs of an engine, writing an empty engine/ folder."""
    ema_layout = "replicated"

    def save(self, path):
        path.mkdir()

    def kind(self) -> str:
        return "FolderEngine"


def test_a_run_rolled_back_keeps_its_new_checkpoints(tmp_path):
    """`latest` set back to a milestone (after a loss spike, say): the steps the run had trained past it counted as
    the newest, so every new checkpoint was pruned as soon as it was written, `latest`'s own among them (reproduced
    with mini_test: rolled back to step-3 and killed after step 5's checkpoint, the start found latest naming a
    deleted step-5)."""
    def save(step):
        return ckpt.save_checkpoint(tmp_path, ckpt.TrainState(step=step), _FolderEngine(), {}, rank=0, world_size=1,
                                    keep_last=2, keep_every=3)

    for step in range(1, 10):
        save(step)
    assert sorted(ckpt.saved_steps(tmp_path)) == [3, 6, 8, 9]
    (tmp_path / "latest").write_text("step-3")
    for step in (4, 5):
        save(step)
        assert ckpt.latest_checkpoint(tmp_path) == tmp_path / f"step-{step}"
    assert sorted(ckpt.saved_steps(tmp_path)) == [3, 4, 5, 6, 8, 9]
    save(6)  # overwrites the old step-6; the pruning up to it as before
    assert sorted(ckpt.saved_steps(tmp_path)) == [3, 5, 6, 8, 9]


def test_a_folder_set_aside_beside_the_checkpoints_is_left_alone(tmp_path):
    """An operator's `mv step-6 step-6.bad`: every save after it stopped the run in the pruning (ValueError:
    invalid literal for int(): '6.bad'), after `latest` had moved on (reproduced with mini_test)."""
    def save(step):
        return ckpt.save_checkpoint(tmp_path, ckpt.TrainState(step=step), _FolderEngine(), {}, rank=0, world_size=1,
                                    keep_last=1)

    save(3)
    _fake_step(tmp_path, 6)
    (tmp_path / "step-6").rename(tmp_path / "step-6.bad")
    for step in (6, 9):
        save(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-6.bad", "step-9"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-9"


class _FileEngine(_FolderEngine):
    """Writes one file in engine/, as DCP and DeepSpeed write theirs."""

    def save(self, path):
        path.mkdir()
        (path / "__0_0.distcp").write_bytes(b"weights")


def test_a_checkpoint_is_on_the_disk_before_its_rename_and_latest_commit_it(tmp_path, monkeypatch):
    """Without fsync, a crash or power loss just after the renames could leave `latest` naming a folder whose
    files never reached the disk (the renames are written out on their own schedule, not after the data)."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt.save_checkpoint(tmp_path, ckpt.TrainState(step=3), _FileEngine(), {"rng": 1}, rank=0, world_size=1,
                         keep_last=2)
    tmp, final, latest = tmp_path / "step-3.tmp", tmp_path / "step-3", tmp_path / "latest"
    commit = events.index(("replace", str(tmp), str(final)))
    point = events.index(("replace", f"{latest}.tmp", str(latest)))
    synced_before = {path for kind, path, *_ in events[:commit] if kind == "fsync"}
    written = {str(tmp / p.relative_to(final)) for p in final.rglob("*")} | {str(tmp)}
    assert written == {str(tmp / n) for n in ("engine", "engine/__0_0.distcp", "rank-0.pt", "meta.json")} | {str(tmp)}
    assert written <= synced_before, written - synced_before
    assert ("fsync", str(tmp_path)) in events[commit:point]  # the rename itself, before `latest` names it
    assert ("fsync", f"{latest}.tmp") in events[commit:point]
    assert events[point + 1:] == [("fsync", str(tmp_path))]


def test_a_crash_while_pruning_leaves_no_folder_that_looks_complete(tmp_path, monkeypatch):
    """Pruning deleted a folder in whatever order the file system listed it: a crash midway could leave meta.json
    (what makes a folder a complete checkpoint) beside half its files, and a start without `latest`, a way back
    offered after an unreadable checkpoint, or an export of that step would then take the broken folder."""
    def save(step):
        return ckpt.save_checkpoint(tmp_path, ckpt.TrainState(step=step), _FileEngine(), {}, rank=0, world_size=1,
                                    keep_last=1)

    save(3)
    for n in range(1, 8):  # more files: the listing puts meta.json in the middle, not first
        (tmp_path / "step-3" / "engine" / f"__{n}_0.distcp").write_bytes(b"weights")
    real_unlink, deleted = os.unlink, []

    def unlink_then_crash(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        deleted.append(path)
        if len(deleted) == 2:
            raise KeyboardInterrupt("the job killed mid-pruning")

    monkeypatch.setattr(os, "unlink", unlink_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save(6)
    monkeypatch.undo()
    assert (tmp_path / "step-3").is_dir() and len(list((tmp_path / "step-3").rglob("*"))) > 1  # half deleted
    assert sorted(ckpt.saved_steps(tmp_path)) == [6]
