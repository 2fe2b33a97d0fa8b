"""Running the real trainer in subprocesses (torchrun, gloo on CPU) from tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from launch.torchrun import free_port  # noqa: F401 - the tests import it from here

REPO = Path(__file__).resolve().parents[1]


def train_env(tmp: Path) -> dict:
    # Not the test runner's own wandb service (set once a test used wandb in-process): each run has its own.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "WANDB_DIR": str(tmp), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(tmp / "cache"),
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "HF_HUB_OFFLINE": "1"})
    return env


def torchrun_cmd(overrides: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "train", *overrides]


def run_train(tmp: Path, overrides: list[str], nproc: int = 2, timeout: int = 300,
              expect: int | None = 0) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(overrides + [f"cluster.gpus_per_node={nproc}"], nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(tmp), capture_output=True, text=True, timeout=timeout)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"exit {proc.returncode} (expected {expect})\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def exported_unet(run_dir: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(run_dir / "export" / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return sd
