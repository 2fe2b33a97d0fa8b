"""The GPU benchmark scripts run end to end at tiny size on the CPU, so a device session (15 minutes,
rare) never fails on a bug. Only that they run and report: no assertion on any timing."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from train_helpers import REPO, train_env


def _run(tmp_path, script, *args):
    proc = subprocess.run([sys.executable, f"bench/{script}", "--device", "cpu", "--arch", "tiny", "--latent", "8",
                           "--batch", "2", "--steps", "2", "--warmup", "1", "--out", str(tmp_path), *args],
                          cwd=REPO, env=train_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_unet_step_bench_measures_ours_and_diffusers(tmp_path):
    _run(tmp_path, "unet_step.py", "--impl", "ours,diffusers", "--channels-last", "both", "--dtype", "fp32")
    results = json.loads((tmp_path / "unet_step.json").read_text())["results"]
    assert {(r["impl"], r["channels_last"]) for r in results} == {(i, c) for i in ("ours", "diffusers")
                                                                   for c in (False, True)}
    assert all(r["status"] == "ok" and math.isfinite(r["img_per_s"]) for r in results), results
    assert "ours/diffusers" in (tmp_path / "unet_step.md").read_text()


def test_trainer_step_bench_runs_the_trainers_step(tmp_path):
    _run(tmp_path, "trainer_step.py", "--channels-last", "--dtype", "fp32")
    rows = json.loads((tmp_path / "trainer_step.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert math.isfinite(rows[0]["img_per_s"]) and math.isfinite(rows[0]["bare_img_per_s"])
    assert rows[0]["syncs"] == "not checked (CPU)"  # the sync check needs CUDA (tests/test_step_sync.py covers CPU)
