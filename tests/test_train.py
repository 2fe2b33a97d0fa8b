"""The trainer end to end: 2 processes (torchrun, gloo, CPU), every backend, exact resume, pre-emption,
non-finite losses. Each run is a few steps of the tiny model on synthetic shards."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch

from data.synth import write_synthetic_shards
from train_helpers import REPO, exported_unet, run_train, status, torchrun_cmd, train_env


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, num_shards=4, samples_per_shard=16, image_size=64, seed=0)
    return f"stage.data.shards='{out}/{{00000..00003}}.tar'"


def _overrides(shards, run_dir, *extra):
    return [shards, f"run.dir={run_dir}", "parallel.precision=fp32", *extra]


def _unet(run_dir):
    sd = exported_unet(run_dir)
    return {k: v for k, v in sd.items() if k.startswith("model.")}


def _ema(run_dir):
    sd = exported_unet(run_dir)
    return {k: v for k, v in sd.items() if k.startswith("model_ema.")}


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, shards):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    run_train(run_dir.parent, _overrides(shards, run_dir, "backend=ddp"))
    return run_dir


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed-1", "deepspeed-2", "deepspeed-3"])
def test_backends_reach_the_same_loss_and_weights(tmp_path, shards, ddp_reference, backend):
    name, _, zero = backend.partition("-")
    extra = [f"backend={name}"] + ([f"parallel.zero_stage={zero}"] if zero else [])
    run_train(tmp_path, _overrides(shards, tmp_path / "run", *extra))
    ref, got = status(ddp_reference), status(tmp_path / "run")
    assert got["state"] == "finished" and got["step"] == ref["step"] == 6
    # Same data, same noise, same init: only the order of floating-point reductions differs.
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    a, b = _unet(ddp_reference), _unet(tmp_path / "run")
    assert a.keys() == b.keys()
    # Adam divides by sqrt(v): parameters with almost no gradient (conv biases in front of a GroupNorm,
    # and in the first steps every layer behind a zero-initialised output conv) move by ~lr per step
    # whatever the sign of their reduction noise, and the zero-initialised tensors are themselves tiny
    # after 6 steps, so a per-tensor relative drift is meaningless for them. Bound the absolute drift by
    # a fraction of the largest possible movement (6 steps x lr 1e-3), and the drift of the whole model.
    drift = [(a[k] - b[k]).abs().max().item() for k in a]
    assert max(drift) < 1e-3
    total = sum((a[k] - b[k]).double().square().sum() for k in a).sqrt() / \
        sum(a[k].double().square().sum() for k in a).sqrt()
    assert total < 1e-4
    ema_a, ema_b = _ema(ddp_reference), _ema(tmp_path / "run")
    assert ema_a.keys() == ema_b.keys() and len(ema_a) == 688
    assert all(torch.allclose(ema_a[k].float(), ema_b[k].float(), rtol=0, atol=1e-3) for k in ema_a)


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_compiled_blocks_train_like_eager(tmp_path, shards, ddp_reference, backend):
    """parallel.compile=true: every UNet block through torch.compile in place (AOTAutograd traces forward
    and backward; the aot_eager backend runs the traced graphs without inductor's kernel build, which
    takes minutes per block on this CPU). Same loss and weights as the eager run, original key names."""
    run_dir = tmp_path / "run"
    run_train(tmp_path, _overrides(shards, run_dir, f"backend={backend}", "parallel.compile=true",
                                   "parallel.compile_backend=aot_eager"))
    assert status(run_dir)["loss"] == pytest.approx(status(ddp_reference)["loss"], rel=1e-4)
    a, b = _unet(ddp_reference), _unet(run_dir)
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_kill_and_resume_is_bitwise_exact(tmp_path, shards, backend):
    straight = tmp_path / "straight"
    run_train(tmp_path, _overrides(shards, straight, f"backend={backend}"))
    broken = tmp_path / "broken"
    offline = "tracking.wandb_mode=offline"
    crash = _overrides(shards, broken, f"backend={backend}", offline, "fault.kill_after_checkpoint_at_step=3")
    run_train(tmp_path, crash, expect=None)
    assert (broken / "checkpoints" / "latest").read_text() == "step-3"
    assert status(broken)["state"] == "running"  # it died, nobody said finished
    run_train(tmp_path, _overrides(shards, broken, f"backend={backend}", offline))
    a, b = exported_unet(straight), exported_unet(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert status(straight)["loss"] == status(broken)["loss"]

    # The resumed process continued the W&B run saved in the checkpoint, from the step after it. (What the
    # killed process had not flushed to its own offline file is lost with it, as with any SIGKILL.)
    from train.wandb_records import read_run

    saved_id = json.loads((broken / "checkpoints" / "step-3" / "meta.json").read_text())["wandb_run_id"]
    files = sorted((broken / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(saved_id in f.name for f in files)
    resumed = read_run(files[-1])
    assert resumed.run_id == saved_id
    assert sorted(r["_step"] for r in resumed.history if "train/loss" in r) == [4, 5, 6]


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed-3"])
def test_a_checkpoint_exports_on_one_process_as_the_stage_exported_it(tmp_path, shards, ddp_reference, backend):
    """checkpoint.export=latest, one process, from a checkpoint of 2 ranks: the trainer's own resume
    (DCP resharding, ZeRO-3's universal conversion, the EMA's pieces put together), then the stage export's
    writer. The latest checkpoint of a finished stage is its last step, so the result must be the stage's
    own export/model.ckpt, bit for bit (raw UNet, EMA, VAE, text encoder, schedule)."""
    name, _, zero = backend.partition("-")
    extra = [f"backend={name}"] + ([f"parallel.zero_stage={zero}"] if zero else [])
    run_dir = tmp_path / "run"
    if name == "ddp":
        shutil.copytree(ddp_reference, run_dir)
    else:
        run_train(tmp_path, _overrides(shards, run_dir, *extra))
    before = (run_dir / "status.json").read_text()
    run_train(tmp_path, _overrides(shards, run_dir, *extra, "checkpoint.export=latest"), nproc=1)
    exported = run_dir / "exports" / "step-6"
    a = exported_unet(run_dir)
    b = torch.load(exported / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and len(_ema(run_dir)) == 688
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((exported / "export.json").read_text())
    assert record == {"step": 6, "arch": "tiny", "stage": "mini_test",
                      "checkpoint": str(run_dir / "checkpoints" / "step-6")}
    assert (run_dir / "status.json").read_text() == before  # the run itself is left as it was


def test_a_kept_step_exports_as_a_stage_that_ended_there(tmp_path, shards, ddp_reference):
    """checkpoint.export=3 of the 6-step reference run (checkpoints at 3 and 6), on one process: the model a
    run of 3 steps exported itself, bit for bit (the schedule, the data order and the noise do not depend
    on the stage's length)."""
    short = tmp_path / "short"
    run_train(tmp_path, _overrides(shards, short, "backend=ddp", "stage.steps=3"))
    run_dir = tmp_path / "run"
    shutil.copytree(ddp_reference, run_dir)
    run_train(tmp_path, _overrides(shards, run_dir, "backend=ddp", "checkpoint.export=3"), nproc=1)
    a = exported_unet(short)
    b = torch.load(run_dir / "exports" / "step-3" / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_dir / "exports" / "step-3" / "export.json").read_text())["checkpoint"] == \
        str(run_dir / "checkpoints" / "step-3")


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "train" in " ".join(c.cmdline())]


def test_preemption_signal_checkpoints_and_asks_for_requeue(tmp_path, shards):
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(_overrides(shards, run_dir, "backend=fsdp", "stage.steps=400",
                                  "checkpoint.every_steps=1000", "cluster.gpus_per_node=2"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # wait until training is under way
            if (run_dir / "status.json").is_file() and status(run_dir)["step"] >= 2:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        for worker in _workers(proc):
            worker.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    s = status(run_dir)
    assert s["state"] == "preempted", out[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{s['step']}"
    assert json.loads((run_dir / "last_exit.json").read_text())["exit_code"] == 75
    # The requeued job resumes where it stopped and finishes.
    run_train(tmp_path, _overrides(shards, run_dir, "backend=fsdp", f"stage.steps={s['step'] + 2}",
                                   "checkpoint.every_steps=1000"))
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == s["step"] + 2


def test_preemption_signal_during_start_up_asks_for_requeue_on_every_rank(tmp_path, shards):
    """The signal reaching rank 0 while it builds its models (after it took the run folder's lock): it used to die
    of it (the signal's default action) and its peer then failed in a collective; where the signal found one rank
    training and another still starting, the stage ended "failed", which the batch script does not requeue. Now
    no step is trained and every rank exits 75."""
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(_overrides(shards, run_dir, "backend=ddp", "cluster.gpus_per_node=2"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "run.lock").is_file() and (run_dir / "run.lock").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.01)
        rank0 = next(w for w in _workers(proc) if w.environ().get("RANK") == "0")
        rank0.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    s = status(run_dir)
    assert s["state"] == "preempted" and s["step"] == 0, out[-3000:]
    assert "pre-emption signal during start-up: nothing trained since step 0; exiting 75" in out
    assert json.loads((run_dir / "last_exit.json").read_text())["exit_code"] == 75
    assert not list((run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_nonfinite_loss_skips_the_update(tmp_path, shards, backend):
    run_dir = tmp_path / "skip"
    run_train(tmp_path, _overrides(shards, run_dir, f"backend={backend}", "fault.nan_loss_at_steps=[2]"))
    s = status(run_dir)
    assert s["state"] == "finished" and s["loss"] == s["loss"]  # finite at the end
    meta = json.loads((run_dir / "checkpoints" / "step-6" / "meta.json").read_text())
    assert meta["nonfinite_skipped"] == 1
    weights = exported_unet(run_dir)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # Trained channels-last (the default), exported in the released files' contiguous layout.
    assert all(v.is_contiguous() for v in weights.values())


def test_nonfinite_losses_in_a_row_abort_with_a_checkpoint(tmp_path, shards):
    run_dir = tmp_path / "abort"
    proc = run_train(tmp_path, _overrides(shards, run_dir, "backend=ddp", "fault.nan_loss_at_steps=[1,2,3,4]",
                                          "checkpoint.max_nonfinite_in_a_row=3"), expect=None)
    assert proc.returncode != 0
    assert status(run_dir)["state"] == "failed"
    # Steps 1-3 are the third in a row; the loop learns it one step later (it never waits for the step
    # it has just queued), so it stops after step 4 and saves step-5 before aborting.
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-5"
    meta = json.loads((run_dir / "checkpoints" / "step-5" / "meta.json").read_text())
    assert meta["nonfinite_skipped"] == 4 and meta["nonfinite_in_a_row"] == 4
    # Numbered as the progress lines number steps (1-based; fault indices are 0-based), and the abort names
    # the streak that caused it, not the count after the step read with it (it said "0 in a row" where
    # a finite step followed).
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row)" in proc.stdout
    assert ("aborting: 3 non-finite steps in a row up to step 4 (read a step late: step 5 ran too); "
            "checkpoint saved at step 5") in proc.stdout


def test_an_error_in_the_step_ends_every_rank_with_its_loader_workers(tmp_path, shards):
    """An exception in the loop (injected here: a bug, an OOM, a library's error) must end the ranks, so that
    torchrun sees the failure. It used to hang them at exit: the traceback kept the loader alive, and
    multiprocessing's exit joined workers that ignore SIGTERM (data/loader.py) forever."""
    run_dir = tmp_path / "error"
    try:
        proc = run_train(tmp_path, _overrides(shards, run_dir, "backend=ddp", "stage.data.num_workers=2",
                                              "fault.raise_at_step=1"), timeout=150, expect=None)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks did not exit within 150 s of an error in the step (a normal short run takes ~30 s)")
    assert proc.returncode != 0
    assert "fault.raise_at_step=1: an error in the step, injected" in proc.stdout + proc.stderr
    # Step 1 had finished: its loss (read a step late, when step 2 failed) is recorded, not lost with step 2.
    s = status(run_dir)
    assert s["state"] == "failed" and s["step"] == 1 and s["loss"] is not None
    assert "step 1/6" in proc.stdout


def test_shards_that_are_not_there_stop_every_rank_at_start_up(tmp_path, shards):
    """A brace range past the shards written (4 of 6 here): rank 0 lists the folder, says which, and the
    group ends with the config-error code. It used to train on the 4, each missing shard skipped as
    unreadable (all missing: the loader's error at the first step, after the models were built)."""
    wider = shards.replace("{00000..00003}", "{00000..00005}")
    proc = run_train(tmp_path, _overrides(wider, tmp_path / "run", "backend=ddp"), timeout=150, expect=None)
    assert proc.returncode != 0
    assert "stage.data.shards: 2 of its 6 shards are not there (" in proc.stdout
    assert "00004.tar" in proc.stdout and not (tmp_path / "run" / "checkpoints").exists()


def test_two_nodes_on_one_host_match_one_node(tmp_path, shards, ddp_reference):
    """Two torchrun agents (--nnodes=2, c10d rendezvous on 127.0.0.1), one process each."""
    from train_helpers import free_port
    import sys

    run_dir = tmp_path / "run"
    port = free_port()
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=twonodes", "-m", "train",
            *_overrides(shards, run_dir, "backend=ddp", "cluster.nodes=2", "cluster.gpus_per_node=1")]
    agents = [subprocess.Popen(base, cwd=REPO, env=train_env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outs[0][-3000:] + outs[1][-3000:]
    assert status(run_dir)["loss"] == pytest.approx(status(ddp_reference)["loss"], rel=1e-6)


def test_wandb_offline_records_the_logged_losses_and_samples(tmp_path, shards):
    from train.wandb_records import read_run

    run_dir = tmp_path / "run"
    run_train(tmp_path, _overrides(shards, run_dir, "backend=fsdp", "tracking.wandb_mode=offline",
                                   "tracking.sample_every=3", "tracking.sample_prompts=[a red circle,a blue square]"))
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_run(wandb_file)
    losses = {row["_step"]: row["train/loss"] for row in records.history if "train/loss" in row}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] == pytest.approx(status(run_dir)["loss"], rel=1e-6)
    assert all(0.0 < v < 10.0 for v in losses.values())
    sample_steps = sorted(row["_step"] for row in records.history if "samples" in row)
    assert sample_steps == [3, 6]
    assert records.config["stage"]["name"] == "mini_test"
    assert records.summary["steps"] == 6


def test_short_run_follows_the_golden_loss_curve(tmp_path):
    """The first two log windows of the embedded default (`./repro train`) against its recorded curve.

    tests/assets/golden_mini_loss.json is the whole curve of `python -m train.mini` (step, loss, stage),
    written from runs/mini/report.json; a change that moves it must re-record it, on purpose."""
    from train.mini import GOLDEN_LOSS, GOLDEN_REL, RUN_NAME, write_data
    from train.wandb_records import read_run

    golden = json.loads(GOLDEN_LOSS.read_text())
    expected = {step: loss for step, loss, stage in golden["loss"] if stage == "mini_v1-1_256" and step <= 20}
    assert sorted(expected) == [10, 20]
    write_data(tmp_path / RUN_NAME / "data")
    run_train(tmp_path, ["stage=mini_v1-1_256", f"run.root={tmp_path}", "stage.steps=20", f"backend={golden['backend']}",
                         "tracking.wandb_mode=offline"])
    (wandb_file,) = (tmp_path / RUN_NAME / "mini_v1-1_256" / "wandb").glob("offline-run-*/run-*.wandb")
    got = {row["_step"]: row["train/loss"] for row in read_run(wandb_file).history if "train/loss" in row}
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=GOLDEN_REL), (step, got[step], loss)  # GOLDEN_REL = 1e-4


def _saved_grad_scaler(checkpoint_dir) -> dict:
    """The GradScaler state inside a DCP checkpoint, read back without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = checkpoint_dir.parent / f"{checkpoint_dir.name}.pt"
    dcp_to_torch_save(checkpoint_dir / "engine", out)
    return torch.load(out, weights_only=False)["grad_scaler"]


def _fp16_straight_and_resumed(tmp_path, shards, backend):
    """An fp16 run straight, and one killed (-9) after its step-3 checkpoint and resumed: their exports are
    bitwise equal. Returns both run folders."""
    def fp16(run_dir, *extra):
        return [shards, f"run.dir={run_dir}", f"backend={backend}", "parallel.precision=fp16", *extra]

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_train(tmp_path, fp16(straight))
    run_train(tmp_path, fp16(broken, "fault.kill_after_checkpoint_at_step=3"), expect=None)
    assert (broken / "checkpoints" / "latest").read_text() == "step-3"
    run_train(tmp_path, fp16(broken))
    a, b = exported_unet(straight), exported_unet(broken)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed fp16 weights differ from the uninterrupted run"
    return straight, broken


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_fp16_loss_scaling_trains_and_resumes_exactly(tmp_path, shards, backend):
    """fp16 with dynamic loss scaling (FSDP2: the sharded scaler, whose inf check is all-reduced): the
    loss scale is saved with the optimiser, so a kill -9 + resume ends bitwise equal to a straight run."""
    straight, broken = _fp16_straight_and_resumed(tmp_path, shards, backend)
    s = status(straight)
    assert s["state"] == "finished" and s["loss"] == s["loss"] == status(broken)["loss"]
    scaler = _saved_grad_scaler(straight / "checkpoints" / "step-6")
    assert 1.0 <= scaler["scale"] <= 2.0 ** 16 and "_growth_tracker" in scaler
    assert scaler == _saved_grad_scaler(broken / "checkpoints" / "step-6")


def test_ema_once_per_micro_batch_as_lightning_did(tmp_path, shards):
    """ema.update_every=micro_batch: the original's LitEma hook ran after every micro-batch, so with
    accumulation 2 (global 8 = 2 ranks x micro 2 x 2) the EMA has counted 2 updates per optimiser step;
    the export keeps that count in model_ema.num_updates, as the original checkpoints do."""
    per_step, per_micro = tmp_path / "step", tmp_path / "micro"
    run_train(tmp_path, _overrides(shards, per_step, "backend=ddp"))
    run_train(tmp_path, _overrides(shards, per_micro, "backend=ddp", "ema.update_every=micro_batch"))
    counts = {d.name: int(exported_unet(d)["model_ema.num_updates"]) for d in (per_step, per_micro)}
    assert counts == {"step": 6, "micro": 12}
    raw, raw_per_step = _unet(per_micro), _unet(per_step)
    assert all(torch.equal(raw_per_step[k], raw[k]) for k in raw)  # the EMA never feeds back into training
    # LitEma's decay (1+n)/(10+n): after 6 steps one update per step weighs the latest weights by
    # 1 - d(6) = 0.56, two per step by 1 - d(11) d(12) = 0.66: the per-micro-batch EMA sits closer to them.
    def distance(run_dir) -> float:
        from models.configs import tiny
        from models.stable_diffusion import load_ldm_checkpoint

        m = load_ldm_checkpoint(run_dir / "export" / "model.ckpt", tiny())
        weights = m.unet.state_dict()
        return sum((m.unet_ema[k] - weights[k]).abs().sum().item() for k in weights)

    assert distance(per_micro) < distance(per_step)


@pytest.fixture(scope="module")
def init_with_distinct_ema(tmp_path_factory, ddp_reference):
    """The reference run's export with its EMA moved 0.1 away from the raw weights, so that a stage which
    failed to carry the EMA over (and began it from the raw weights) would show."""
    out = tmp_path_factory.mktemp("init") / "model.ckpt"
    checkpoint = torch.load(ddp_reference / "export" / "model.ckpt", map_location="cpu", weights_only=True)
    sd = checkpoint["state_dict"]
    for key in [k for k in sd if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")]:
        sd[key] = sd[key] + 0.1
    torch.save(checkpoint, out)
    return out


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed-3"])
def test_stage_init_carries_the_ema_into_every_backend(tmp_path, shards, init_with_distinct_ema, backend):
    """A stage starting from a checkpoint puts its EMA into each backend's layout (FSDP2 shards, ZeRO-3's flat
    partitions: this crashed with a shape mismatch before). After one step the EMA is LitEma's next update
    of it, computed here: its count n carried with it (model_ema.num_updates, here the reference run's 6 steps),
    decay (1 + n + 1) / (10 + n + 1), towards the raw weights the run exported."""
    from models.configs import tiny
    from models.stable_diffusion import load_ldm_checkpoint

    name, _, zero = backend.partition("-")
    run_dir = tmp_path / "run"
    run_train(tmp_path, _overrides(shards, run_dir, f"backend={name}", "stage.steps=1",
                                   f"stage.init.from_checkpoint={init_with_distinct_ema}",
                                   *([f"parallel.zero_stage={zero}"] if zero else [])))
    start = load_ldm_checkpoint(init_with_distinct_ema, tiny()).unet_ema
    after = load_ldm_checkpoint(run_dir / "export" / "model.ckpt", tiny())
    carried = int(torch.load(init_with_distinct_ema, map_location="cpu", weights_only=True)["state_dict"]
                  ["model_ema.num_updates"])
    assert carried == 6
    raw, decay = after.unet.state_dict(), (1 + carried + 1) / (10 + carried + 1)
    assert start.keys() == after.unet_ema.keys() == raw.keys()
    worst = max((after.unet_ema[k] - (decay * start[k] + (1 - decay) * raw[k])).abs().max().item() for k in raw)
    assert worst < 1e-5


def _resumed_with_new_settings(tmp_path, two_shards, backend) -> dict:
    """Two steps at lr 1e-4, weight decay 0.01, EMA decay 0.9999, a checkpoint, then a resume of it with
    lr 2e-5, weight decay 0, betas (0.8, 0.99), eps 1e-6, EMA decay 0.99: the settings the resumed run holds."""
    import contextlib
    import os

    from train_helpers import in_process_trainer, one_rank_group

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what torchrun sets and DeepSpeed reads
    common = [f"backend={backend}", "parallel.precision=fp32", "parallel.channels_last=false",
              "optim.warmup_steps=100"]
    with one_rank_group(backend, always=True):
        first = in_process_trainer(tmp_path, two_shards, *common)
        batches = iter(first.loader)
        for _ in range(2):
            first.optimizer_step([next(batches)], preempt_requested=False, encode_autocast=contextlib.nullcontext())
            first.state.step += 1
        first.save()
        first.stop_loader()
        resumed = in_process_trainer(tmp_path, two_shards, *common, "optim.lr=2e-5", "optim.weight_decay=0.0",
                                     "optim.beta1=0.8", "optim.beta2=0.99", "optim.eps=1e-6", "ema.max_decay=0.99")
        resumed.stop_loader()
        group = resumed.engine.scheduler.optimizer.param_groups[0]
        return {"step": resumed.state.step, "lr": resumed.engine.lr(), "initial_lr": group["initial_lr"],
                "base_lrs": resumed.engine.scheduler.base_lrs, "weight_decay": group["weight_decay"],
                "betas": tuple(group["betas"]), "eps": group["eps"], "ema_max_decay": resumed.ema.max_decay}


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_a_resume_takes_the_configured_lr_and_optimiser_settings(tmp_path, two_shards, backend):
    """Lowering the LR (or changing AdamW's settings, the EMA decay) and resuming is what one does after a loss
    spike: the optimiser's and the schedule's state dicts bring the saved values back, and the config must win
    over them, the same on every backend. The schedule keeps its step: the LR is the new one at step 2 of the
    warmup (CompVis' LambdaLinearScheduler: 1e-6 + (1 - 1e-6) * 2 / 100)."""
    from train.lr import warmup_multiplier
    from train_helpers import in_fresh_process

    out = in_fresh_process(_resumed_with_new_settings, tmp_path, two_shards, backend)  # DeepSpeed: its own process
    assert out == {"step": 2, "lr": pytest.approx(2e-5 * warmup_multiplier(2, 100, 1e-6), rel=1e-12),
                   "initial_lr": 2e-5, "base_lrs": [2e-5], "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-6,
                   "ema_max_decay": 0.99}


def test_deepspeed_fp16_trains_and_resumes_exactly(tmp_path, shards):
    """DeepSpeed's fp16 (its own dynamic loss scale, micro-batch gradients summed in fp32): a kill -9 +
    resume ends bitwise equal to a straight run."""
    straight, broken = _fp16_straight_and_resumed(tmp_path, shards, "deepspeed")
    assert status(straight)["loss"] == status(broken)["loss"]
