"""One training run per run folder (train/run_lock.py): a second run given the same run.dir stops before it
writes anything, and a killed run's folder is free again at once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from train.run_lock import RunDirInUse, hold_run_dir, release_run_dir
from train_helpers import REPO, free_port, status, train_env
from test_train import shards  # noqa: F401 - the module's synthetic shards


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path):
    fd = hold_run_dir(tmp_path / "run")
    try:
        with pytest.raises(RunDirInUse, match=rf'in use by another training run \(.*"pid": {os.getpid()}.*run.dir'):
            hold_run_dir(tmp_path / "run")
    finally:
        release_run_dir(fd)
    release_run_dir(hold_run_dir(tmp_path / "run"))  # free once let go


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """Loader workers are forked from the trainer: were the lock theirs too, a trainer killed with -9 would leave
    its folder locked until they noticed, and torchrun's restart would be refused."""
    fd = hold_run_dir(tmp_path / "run")
    read_end, write_end = os.pipe()
    started_read, started_write = os.pipe()
    child = os.fork()
    if child == 0:  # a worker outliving its trainer: says it has started (the fork hooks have run), then waits
        os.write(started_write, b"1")
        os.read(read_end, 1)
        os._exit(0)
    try:
        os.read(started_read, 1)
        release_run_dir(fd)  # the trainer gone
        release_run_dir(hold_run_dir(tmp_path / "run"))
    finally:
        os.write(write_end, b"1")
        os.waitpid(child, 0)
        for end in (read_end, write_end, started_read, started_write):
            os.close(end)


def test_a_second_run_in_a_running_runs_folder_stops_before_writing(tmp_path, shards):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", shards, f"run.dir={run_dir}", "backend=ddp", "parallel.precision=fp32",
           "cluster.gpus_per_node=1", "stage.global_batch=4", "stage.steps=1000", "checkpoint.every_steps=1000"]
    first = subprocess.Popen(cmd, cwd=REPO, env=train_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "status.json").is_file() and status(run_dir)["step"] >= 1):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        second = subprocess.run(cmd, cwd=REPO, env=train_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
        assert f"{run_dir} is in use by another training run" in second.stdout
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == first.pid
        assert status(run_dir)["pid"] == first.pid and status(run_dir)["state"] == "running"
        assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    finally:
        first.kill()
        first.communicate()


@pytest.mark.parametrize("refusal", ["run folder in use", "shards missing"])
def test_a_start_rank_0_refuses_stops_every_rank_with_the_reason_once(tmp_path, shards, refusal):
    """Two ranks under torchrun. Rank 0 alone checks the shards and takes the lock; rank 1 used to wait in a
    collective for it and die of the broken connection, its traceback hiding the reason. Now every rank ends
    with rank 0's exit code 2 and the reason is printed once; the live run's folder and log stay as they were."""
    run_dir = tmp_path / "run"
    holder = hold_run_dir(run_dir) if refusal == "run folder in use" else None  # the live run: this process
    log = run_dir / "hydra" / "main.log"
    log.parent.mkdir(parents=True)
    log.write_text("the live run's log\n")
    data = shards if holder is not None else f"stage.data.shards='{tmp_path}/none/{{00000..00003}}.tar'"
    # The agent looks at its workers every 2 s: both ranks have ended by then, so each one's own exit code shows.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "--monitor-interval=2", "-m", "train", data, f"run.dir={run_dir}", "backend=ddp",
           "parallel.precision=fp32", "cluster.gpus_per_node=2", "stage.global_batch=4"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=train_env(tmp_path), capture_output=True, text=True, timeout=300)
    finally:
        if holder is not None:
            release_run_dir(holder)
    reason = "is in use by another training run" if holder is not None else "shards are not there"
    assert proc.returncode != 0 and proc.stdout.count(reason) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("exitcode  : 2 ") == 2 and "RuntimeError" not in proc.stderr, proc.stderr[-4000:]
    assert log.read_text() == "the live run's log\n"
    assert sorted(p.name for p in run_dir.iterdir()) == (["hydra", "run.lock"] if holder is not None else ["hydra"])
