"""Tracking: W&B offline runs read back from their .wandb files, the throughput meter, console output."""
from __future__ import annotations

import io
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.config import TrackingConfig
from train.meters import ThroughputMeter, to_scalar
from train.progress import Progress, format_duration, format_line, format_summary
from train.tracking import Tracker
from train.wandb_records import WandbFileError, read_run

OFFLINE_DIR = re.compile(r"offline-run-\d{8}_\d{6}-(?P<id>[a-z0-9]+)(-\d+)?")
# wandb adds these to every history row / summary; the tests compare what we logged.
WANDB_ROW_KEYS = ("_timestamp", "_runtime")


@pytest.fixture(scope="module", autouse=True)
def _stop_wandb_service():
    """Tracker.finish() stops wandb's service process; this stops it too when a test failed first."""
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep W&B off the network and out of the real home: every path it uses lives in tmp_path."""
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    dirs = {"HOME": "home", "XDG_CACHE_HOME": "cache", "XDG_CONFIG_HOME": "config", "TMPDIR": "tmp",
            "WANDB_DIR": "wandb_default", "WANDB_CONFIG_DIR": "wandb_config",
            "WANDB_CACHE_DIR": "wandb_cache", "WANDB_DATA_DIR": "wandb_data",
            "WANDB_ARTIFACT_DIR": "wandb_artifacts"}
    for var, sub in dirs.items():
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Not needed for correctness; they keep each run start cheap on a shared 2-core machine.
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    monkeypatch.setenv("WANDB__DISABLE_MACHINE_INFO", "true")
    monkeypatch.setenv("WANDB__DISABLE_UPDATE_CHECK", "true")
    return tmp_path


def _config() -> dict:
    return {"run": {"name": "toy"}, "stage": {"name": "s256", "steps": 6, "global_batch": 8},
            "optim": {"lr": 1e-4}, "ckpt_dir": Path("/ckpt/toy")}


def _user_rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in WANDB_ROW_KEYS} for row in history]


def test_offline_run_reads_back_exactly(wandb_env: Path) -> None:
    run_dir = wandb_env / "runs" / "toy" / "s256"
    config = _config()
    config["notes"] = "x" * 70_000  # a record over two 32 KiB blocks: FIRST/MIDDLE/LAST chunks
    cfg = TrackingConfig(wandb_mode="offline")
    tracker = Tracker(cfg, run_dir, config, run_id=None, rank=0, resume=False)
    losses = {0: 0.75, 10: 0.5, 20: torch.tensor(0.25), 30: 0.125}
    for step, loss in losses.items():
        tracker.log({"train/loss": loss, "train/lr": 1e-4 * (step + 1), "train/step_in_epoch": step // 10},
                    step=step)
    pixels = torch.zeros(2, 3, 8, 8)
    pixels[0, 0] = 1.0  # red
    tracker.log_images("samples", pixels, ["a red circle", "a blue square"], step=30)
    tracker.log_images("samples_pil", [Image.new("RGB", (4, 4), (0, 0, 255))], ["blue"], step=30)
    tracker.summary({"final_loss": 0.125, "skipped_samples": {"bad_jpeg": 2}, "checkpoint": Path("/ckpt/x")})
    tracker.finish()
    tracker.finish()  # idempotent

    offline = tracker.offline_run_dir
    assert offline is not None and offline.parent == run_dir / "wandb"
    assert OFFLINE_DIR.fullmatch(offline.name).group("id") == tracker.run_id
    run = read_run(offline)
    assert run.run_id == tracker.run_id and run.project == "sd-repro"
    assert (run.name, run.group, run.job_type) == ("toy/s256", "toy", "s256")
    assert run.exit_code == 0 and not run.truncated
    expected_config = {**config, "ckpt_dir": "/ckpt/toy"}
    assert run.config == expected_config

    rows = _user_rows(run.history)
    assert [row["_step"] for row in rows] == [0, 10, 20, 30]
    for row, (step, loss) in zip(rows, losses.items()):
        assert row["train/loss"] == to_scalar(loss)
        assert row["train/lr"] == pytest.approx(1e-4 * (step + 1), rel=1e-15)
        assert row["train/step_in_epoch"] == step // 10
    # Both image logs went into step 30's row, next to the scalars.
    samples, pil = rows[-1]["samples"], rows[-1]["samples_pil"]
    assert samples["_type"] == "images/separated" and samples["count"] == 2
    assert samples["captions"] == ["a red circle", "a blue square"]
    assert pil["captions"] == ["blue"]
    first = Image.open(offline / "files" / samples["filenames"][0]).convert("RGB")
    assert first.size == (8, 8) and first.getpixel((0, 0)) == (255, 0, 0)

    assert run.summary["final_loss"] == 0.125
    assert run.summary["skipped_samples"] == {"bad_jpeg": 2}
    assert run.summary["checkpoint"] == "/ckpt/x"
    assert run.summary["train/loss"] == 0.125 and run.summary["_step"] == 30
    assert run.metric("train/loss") == [(0, 0.75), (10, 0.5), (20, 0.25), (30, 0.125)]

    # The reader tolerates a writer killed mid-record, and refuses a corrupted file.
    wandb_file = next(offline.glob("run-*.wandb"))
    data = wandb_file.read_bytes()
    torn = wandb_env / "torn.wandb"
    torn.write_bytes(data[:-3])
    torn_run = read_run(torn)
    assert torn_run.truncated and torn_run.exit_code is None
    assert [r["_step"] for r in torn_run.history] == [0, 10, 20, 30]
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF
    (wandb_env / "corrupt.wandb").write_bytes(bytes(corrupt))
    with pytest.raises(WandbFileError, match="checksum"):
        read_run(wandb_env / "corrupt.wandb")
    (wandb_env / "not.wandb").write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(WandbFileError, match="not a W&B"):
        read_run(wandb_env / "not.wandb")


def test_resume_continues_the_same_run(wandb_env: Path) -> None:
    run_dir = wandb_env / "run"
    cfg = TrackingConfig(wandb_mode="offline")
    first = Tracker(cfg, run_dir, _config(), run_id=None, rank=0, resume=False)
    for step in (0, 1, 2):
        first.log({"train/loss": 1.0 / (step + 1)}, step=step)
    first.finish()
    saved_id = first.run_id  # what the trainer writes into its checkpoint

    with Tracker(cfg, run_dir, _config(), run_id=saved_id, rank=0, resume=True) as second:
        assert second.run_id == saved_id
        for step in (3, 4, 5):
            second.log({"train/loss": 1.0 / (step + 1)}, step=step)
    assert not second.active

    assert first.offline_run_dir != second.offline_run_dir
    before, after = read_run(first.offline_run_dir), read_run(second.offline_run_dir)
    assert before.run_id == after.run_id == saved_id
    # Both started within the same second here: wandb appends "-1" to the second folder's name.
    assert OFFLINE_DIR.fullmatch(second.offline_run_dir.name).group("id") == saved_id
    assert [r["_step"] for r in before.history] == [0, 1, 2]
    assert [r["_step"] for r in after.history] == [3, 4, 5]
    assert after.metric("train/loss") == [(s, pytest.approx(1.0 / (s + 1))) for s in (3, 4, 5)]


def test_a_run_started_again_before_its_first_checkpoint_continues_its_w_and_b_run(wandb_env: Path) -> None:
    """The id was only in checkpoints: a stage that crashed before its first one forked a second W&B run
    with overlapping steps when started again. Rank 0 keeps the id in the run folder from the start."""
    run_dir = wandb_env / "run"
    cfg = TrackingConfig(wandb_mode="offline")
    first = Tracker(cfg, run_dir, _config(), run_id=None, rank=0, resume=False)
    first.log({"train/loss": 1.0}, step=1)
    first.finish(1)
    with Tracker(cfg, run_dir, _config(), run_id=None, rank=0, resume=False) as again:
        assert again.run_id == first.run_id
        again.log({"train/loss": 0.5}, step=2)
        # Records reach the file within a second (wandb-core's default, 15 s, lost that much at a kill -9).
        assert again._run.settings.x_transaction_log_flush_interval == 1.0
    assert read_run(again.offline_run_dir).run_id == first.run_id
    # A checkpoint's id, where there is one, is the one.
    with Tracker(cfg, run_dir, _config(), run_id="fromckpt", rank=0, resume=True) as resumed:
        assert resumed.run_id == "fromckpt"


class _NotANumber:
    """Would fail in to_scalar: proves a no-op tracker never reads (or syncs) the values it is given."""


@pytest.mark.parametrize("mode, rank", [("disabled", 0), ("offline", 1), ("online", 3)])
def test_disabled_and_other_ranks_write_nothing(wandb_env: Path, mode: str, rank: int) -> None:
    run_dir = wandb_env / "run"
    tracker = Tracker(TrackingConfig(wandb_mode=mode), run_dir, _config(), run_id="keepme", rank=rank,
                      resume=True)
    tracker.log({"train/loss": _NotANumber()}, step=1)
    tracker.log_images("samples", torch.zeros(1, 3, 4, 4), ["c"], step=1)
    tracker.summary({"final_loss": _NotANumber()})
    tracker.finish()
    assert not tracker.active and tracker.offline_run_dir is None and tracker.run_id == "keepme"
    written = [p for p in wandb_env.rglob("*") if p.is_file()]
    assert written == [] and not run_dir.exists()


def test_to_scalar() -> None:
    assert to_scalar(torch.tensor(2)) == 2 and isinstance(to_scalar(torch.tensor(2)), int)
    assert to_scalar(torch.tensor([0.5])) == 0.5 and to_scalar(True) is True
    assert type(to_scalar(np.float32(0.5))) is float and to_scalar(np.int64(3)) == 3
    with pytest.raises(ValueError, match="scalar tensor"):
        to_scalar(torch.zeros(2))
    with pytest.raises(TypeError):
        to_scalar("0.5")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_throughput_meter_math() -> None:
    clock = FakeClock()
    flops = 537e9  # SD v1 UNet, one image at 256 px, forward + backward
    meter = ThroughputMeter(world_size=8, flops_per_image=flops, peak_tflops=989.0, clock=clock)
    for _ in range(4):  # 4 steps of 32 local images, 0.5 s each, 0.1 s of it waiting for data
        with meter.waiting_for_data():
            clock.t += 0.1
        clock.t += 0.4
        meter.step_done(32)
    out = meter.window()
    assert out["throughput/img_per_s_per_gpu"] == pytest.approx(128 / 2.0)
    assert out["throughput/img_per_s"] == pytest.approx(8 * 64.0)
    assert out["throughput/tflops_per_gpu"] == pytest.approx(64.0 * flops / 1e12)
    assert out["throughput/mfu"] == pytest.approx(64.0 * flops / 989.0 / 1e12)
    assert out["throughput/data_wait_frac"] == pytest.approx(0.2)

    # The window reset: the next one sees only its own time, images and waits.
    meter.data_wait_start()
    clock.t += 1.0
    meter.data_wait_end()
    clock.t += 1.0
    meter.step_done(10)
    out = meter.window()
    assert out["throughput/img_per_s_per_gpu"] == pytest.approx(5.0)
    assert out["throughput/data_wait_frac"] == pytest.approx(0.5)

    # A wait that spans a window boundary is split between the two windows.
    meter.data_wait_start()
    clock.t += 3.0
    assert meter.window()["throughput/data_wait_frac"] == pytest.approx(1.0)
    clock.t += 1.0
    meter.data_wait_end()
    clock.t += 3.0
    meter.step_done(4)
    assert meter.window()["throughput/data_wait_frac"] == pytest.approx(0.25)
    assert meter.window() == {}  # no time passed


def test_throughput_meter_reports_encoders_beside_the_model() -> None:
    """MFU is of the UNet's FLOPs; the frozen encoders the loop runs come beside it, not into it."""
    clock = FakeClock()
    unet, encoders = 537e9, 273e9 + 13e9  # 256 px: UNet fwd + bwd; VAE encoder and text encoder forward
    meter = ThroughputMeter(world_size=8, flops_per_image=unet, peak_tflops=989.0, clock=clock,
                            encoder_flops_per_image=encoders)
    clock.t += 1.0
    meter.step_done(64)
    out = meter.window()
    assert out["throughput/mfu"] == pytest.approx(64 * unet / 989e12)
    assert out["throughput/mfu_with_encoders"] == pytest.approx(64 * (unet + encoders) / 989e12)
    assert out["throughput/tflops_per_gpu_with_encoders"] == pytest.approx(64 * (unet + encoders) / 1e12)
    # Latents and contexts precomputed: nothing beside it.
    meter = ThroughputMeter(world_size=8, flops_per_image=unet, peak_tflops=989.0, clock=clock)
    clock.t += 1.0
    meter.step_done(64)
    assert not [k for k in meter.window() if k.endswith("_with_encoders")]


def test_throughput_meter_without_peak_omits_mfu() -> None:
    clock = FakeClock()
    meter = ThroughputMeter(world_size=1, flops_per_image=1e9, peak_tflops=None, clock=clock)
    clock.t += 2.0
    meter.step_done(4)
    out = meter.window()
    assert "throughput/mfu" not in out
    assert out["throughput/tflops_per_gpu"] == pytest.approx(2e9 / 1e12)
    with pytest.raises(RuntimeError):
        meter.data_wait_end()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_lines_when_not_a_tty() -> None:
    clock = FakeClock()
    out = io.StringIO()
    progress = Progress(TrackingConfig(), total_steps=1000, start_step=100, rank=0, stream=out, clock=clock)
    assert not progress.uses_bar
    progress.step(101)
    assert out.getvalue() == ""  # nothing between log steps
    clock.t += 60.0
    progress.log(120, loss=torch.tensor(0.12345), lr=1e-4, img_per_s=512.0)
    assert out.getvalue() == ("step   120/1,000 ( 12.0%) | loss 0.1235 | lr 1.00e-04 | img/s 512.0 | "
                              "elapsed 0:01:00 | eta 0:44:00\n")
    progress.write("saved checkpoint")
    assert out.getvalue().endswith("saved checkpoint\n")
    progress.close()


def test_progress_bar_on_a_tty_and_silent_ranks() -> None:
    tty = _Tty()
    bar = Progress(TrackingConfig(progress_bar=True), total_steps=50, rank=0, stream=tty)
    assert bar.uses_bar
    for step in range(1, 11):
        bar.step(step)
    bar.log(10, loss=0.5, lr=2e-4, img_per_s=100.0)
    bar.close()
    text = tty.getvalue()
    assert "10/50" in text and "loss 0.5000" in text and "img/s 100.0" in text

    assert not Progress(TrackingConfig(progress_bar=False), total_steps=50, stream=_Tty()).uses_bar
    silent = io.StringIO()
    other_rank = Progress(TrackingConfig(), total_steps=50, rank=1, stream=silent)
    other_rank.step(5)
    other_rank.log(5, loss=_NotANumber())
    other_rank.write("x")
    assert silent.getvalue() == ""


def test_format_helpers() -> None:
    assert format_duration(3725.4) == "1:02:05" and format_duration(-1) == "0:00:00"
    assert format_line(5, 10) == "step  5/10 ( 50.0%)"
    table = format_summary({
        "checkpoint": Path("/runs/toy/s256/step_000010"),
        "steps": 10_000, "samples_seen": 20_480_000, "final_loss": 0.123456, "mean_img_per_s": 1234.56,
        "wall_time_s": 7322.0, "skipped_updates": 3,
        "skipped_samples": {"too_small": 5, "bad_jpeg": torch.tensor(1)},
        "nonfinite_losses": 0,
    })
    assert table.splitlines() == [
        "run summary",
        "  steps             10,000",
        "  samples seen      20,480,000",
        "  final loss        0.1235",
        "  mean img/s        1,234.6",
        "  wall time         2:02:02",
        "  skipped updates   3",
        "  skipped samples   6",
        "    bad_jpeg        1",
        "    too_small       5",
        "  checkpoint        /runs/toy/s256/step_000010",
        "  nonfinite_losses  0",
    ]
    assert format_summary({"final_loss": math.nan, "steps": None}).splitlines() == [
        "run summary", "  steps       n/a", "  final loss  nan"]


def test_mfu_peak_follows_cluster_gpu_name(monkeypatch) -> None:
    """cluster.gpu_name, when set, names the card the MFU is of; else the driver's name does."""
    from train.flops import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops("cuda", "bf16") == 989.0
    assert peak_tflops("cuda", "bf16", "H100 PCIe") == 756.0
    assert peak_tflops("cuda", "bf16", "A100-SXM4-80GB") == 312.0
    assert peak_tflops("cpu", "bf16", "A100-SXM4-80GB") is None


def test_throughput_meter_leaves_out_paused_work() -> None:
    """Validation, sample grids and checkpoint saves run between steps: their time must not count in the
    window's img/s and MFU (a 2 s sample grid once made the next window's img/s a tenth of the steps')."""
    clock = FakeClock()
    meter = ThroughputMeter(world_size=2, flops_per_image=1e12, peak_tflops=100.0, clock=clock)
    for _ in range(2):  # 2 steps of 8 local images, 0.5 s each
        clock.t += 0.5
        meter.step_done(8)
    with meter.paused():  # a sample grid
        clock.t += 2.0
    with meter.waiting_for_data():
        clock.t += 0.25
    clock.t += 0.25
    meter.step_done(8)
    out = meter.window()
    assert out["throughput/img_per_s_per_gpu"] == pytest.approx(24 / 1.5)
    assert out["throughput/mfu"] == pytest.approx(24 / 1.5 * 1e12 / 1e12 / 100.0)
    assert out["throughput/data_wait_frac"] == pytest.approx(0.25 / 1.5)
    with meter.paused():  # a checkpoint save right after the window: it is not the next one's either
        clock.t += 5.0
    clock.t += 0.5
    meter.step_done(8)
    assert meter.window()["throughput/img_per_s_per_gpu"] == pytest.approx(16.0)


def test_throughput_windows_end_when_their_steps_did_not_when_they_are_read() -> None:
    """The trainer reads a step's results one step late, and at a checkpoint or validation step it reads
    two back to back. On the CPU it passes each step's end time: a window of 1 s steps is 1 s long whatever
    the reading order (read at its reading time, windows of 2 s and ~0 s gave 888 and 2,594 img/s around
    every checkpoint where 3 was right). A wait for the next step's data that falls after the window's end
    belongs to the next window."""
    clock = FakeClock()
    meter = ThroughputMeter(world_size=1, flops_per_image=1e9, peak_tflops=None, clock=clock)
    done, pending, windows = {}, None, []
    for step in range(6):  # as the trainer's loop: logging every step, a checkpoint every third
        with meter.waiting_for_data():
            clock.t += 0.25
        clock.t += 0.75
        done[step] = meter.now()
        reads = ([pending] if pending is not None else []) + ([step] if step % 3 == 2 else [])
        pending = None if step % 3 == 2 else step
        for r in reads:
            meter.step_done(4)
            windows.append(meter.window(at=done[r]))
        if step % 3 == 2:
            with meter.paused():  # the checkpoint save
                clock.t += 3.0
    assert len(windows) == 6
    assert [w["throughput/img_per_s"] for w in windows] == pytest.approx([4.0] * 6)
    assert [w["throughput/data_wait_frac"] for w in windows] == pytest.approx([0.25] * 6)
