"""The trainer's sample grids are drawn with the EMA weights (as CompVis' image logger drew them), and
drawing them leaves training exactly where it was, on every backend (tests/sample_weights_worker.py
says how that is checked)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from launch.torchrun import free_port
from train.config import ConfigError, validate
from train_helpers import REPO, compose_train_config, in_process_trainer, train_env


def test_samples_use_the_ema_and_leave_the_raw_weights_exact(tmp_path, two_shards):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(REPO / "tests" / "sample_weights_worker.py"), two_shards, str(tmp_path), "ddp", "fsdp", "zero2", "zero3"]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.stdout.count("samples drawn with the EMA, raw weights exact after") == 4, proc.stdout


def test_raw_weights_are_drawn_as_they_are(tmp_path, two_shards):
    from sample_weights_worker import raw_weights, train_steps

    trainer = in_process_trainer(tmp_path, two_shards, "backend=ddp", "parallel.precision=fp32",
                                 "tracking.sample_weights=raw")
    train_steps(trainer, 1)
    raw = raw_weights(trainer)
    with trainer._weights_for_samples() as weights:
        assert weights == "raw weights at step 1"
        assert all(torch.equal(raw[n], v) for n, v in raw_weights(trainer).items())


def test_ema_samples_without_an_ema_are_refused():
    without_ema = ("stage.data.shards=x.tar", "tracking.sample_every=100", "ema.enabled=false")
    with pytest.raises(ConfigError, match="tracking.sample_weights=raw"):
        validate(compose_train_config(*without_ema), 1)
    validate(compose_train_config(*without_ema, "tracking.sample_weights=raw"), 1)
    with pytest.raises(ConfigError, match="choose ema or raw"):
        validate(compose_train_config("stage.data.shards=x.tar", "tracking.sample_weights=best"), 1)
