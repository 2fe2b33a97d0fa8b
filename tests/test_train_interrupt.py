"""Ctrl-C (SIGINT): the first one stops the run as a pre-emption does (the step finishes, a checkpoint, exit 75,
state "preempted"); a second one stops it at once (KeyboardInterrupt, state "failed"). A Ctrl-C used to end the
loop with a KeyboardInterrupt that the trainer's `except Exception` missed, leaving the state "running"."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from train_helpers import REPO, _compose, status, train_env

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@pytest.fixture
def signal_handlers():
    """The trainer installs its own handlers (train/signals.py): the test runner gets its own back after."""
    saved = {sig: signal.getsignal(sig) for sig in HANDLED}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def run_locks():
    """run() holds its run folder's lock for the life of the process: let this test's go after it."""
    from train import run_lock

    before = list(run_lock._held)
    yield
    for fd in [fd for fd in run_lock._held if fd not in before]:
        run_lock.release_run_dir(fd)


def _run_with_ctrl_c_at(tmp_path, shards, monkeypatch, step: int, presses: int):
    """train.trainer.run() in this process, one CPU rank, with `presses` Ctrl-Cs delivered during step `step`."""
    from train.main import to_dataclass
    from train.trainer import Trainer, run

    real_step = Trainer.optimizer_step

    def step_with_ctrl_c(self, *args, **kwargs):
        if self.state.step == step:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)  # the handler runs before this returns
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "optimizer_step", step_with_ctrl_c)
    cfg = _compose([f"stage.data.shards='{shards}'", f"run.dir={tmp_path / 'run'}", "backend=ddp",
                    "parallel.precision=fp32", "stage.steps=20", "checkpoint.every_steps=100"])
    return run(to_dataclass(cfg), OmegaConf.to_container(cfg, resolve=True))


def test_first_ctrl_c_checkpoints_and_exits_as_a_preemption(tmp_path, two_shards, monkeypatch, signal_handlers,
                                                            run_locks, capfd):
    code = _run_with_ctrl_c_at(tmp_path, two_shards, monkeypatch, step=2, presses=1)
    run_dir, printed = tmp_path / "run", capfd.readouterr()
    s = status(run_dir)
    assert code == 75 and s["state"] == "preempted", printed.out[-3000:]
    # Pressed in step 3 (after it read the flag), voted on in step 4, read a step late as every vote is: step 5
    # ran too, then the checkpoint.
    assert s["step"] == 5 and (run_dir / "checkpoints" / "latest").read_text() == "step-5"
    assert "Ctrl-C again to stop at once without one" in printed.err


def test_second_ctrl_c_stops_at_once_and_marks_the_run_failed(tmp_path, two_shards, monkeypatch, signal_handlers,
                                                              run_locks):
    with pytest.raises(KeyboardInterrupt):
        _run_with_ctrl_c_at(tmp_path, two_shards, monkeypatch, step=2, presses=2)
    s = status(tmp_path / "run")
    assert s["state"] == "failed" and s["error"] == "KeyboardInterrupt"
    assert s["step"] == 2  # steps 1 and 2 trained, the third interrupted
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_ctrl_c_in_a_terminal_reaches_loader_workers_too_and_still_checkpoints(tmp_path, two_shards):
    """A terminal's Ctrl-C signals the whole foreground process group: `python -m train` and its data-loader
    workers (torchrun's agent, too, passes it to each rank's group)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", f"stage.data.shards='{two_shards}'", f"run.dir={run_dir}", "backend=ddp",
           "cluster.gpus_per_node=1", "stage.global_batch=4", "stage.data.num_workers=2", "parallel.precision=fp32",
           "stage.steps=400", "checkpoint.every_steps=1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not ((run_dir / "status.json").is_file() and status(run_dir)["step"] >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    s = status(run_dir)
    assert proc.returncode == 75 and s["state"] == "preempted", out[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{s['step']}"
    assert json.loads((run_dir / "last_exit.json").read_text())["exit_code"] == 75
    # Said once: the loader workers ignore it (forked, they had the trainer's handler, and said it each).
    assert out.count("Ctrl-C again to stop at once") == 1, out[-3000:]
