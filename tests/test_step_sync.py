"""The training step never waits for the device, and its device-side skip is exact.

On CUDA, reading a value the step computed (`.item()`, `float(t)`, `bool(t)`) stalls the host until the
device's queue drains. Every such read goes through one dispatcher op, `aten._local_scalar_dense`, on
any device, so a dispatch mode sees each one on the CPU too: inside the optimiser step there must be
none. (Blocking host-to-device copies are the other stall; the loader pins memory on CUDA and the step
copies with non_blocking=True, which only a GPU can check: bench/gpu_run.sh runs the trainer's step
under torch.cuda.set_sync_debug_mode("error").)
"""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train_helpers import in_fresh_process, in_process_trainer, one_rank_group

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
              torch.ops.aten.is_nonzero.default}


class HostReads(TorchDispatchMode):
    """Records every op that hands a tensor's value to Python."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            # Where it happened: the innermost frame of this project (not torch's).
            frames = [f for f in traceback.extract_stack() if "site-packages" not in f.filename
                      and "/torch/" not in f.filename and f.filename != __file__]
            self.reads.append(f"{func} at {frames[-1].filename}:{frames[-1].lineno}" if frames else str(func))
        return func(*args, **(kwargs or {}))


def test_the_detector_sees_the_usual_host_reads():
    t = torch.tensor([1.5])
    with HostReads() as mode:
        float(t), bool(t > 0), t.item(), int(t.sum())  # noqa: B018
    assert len(mode.reads) == 4 and all(r.startswith("aten.") for r in mode.reads)


def _steps(trainer, n):
    """n optimiser steps as the loop runs them. The batches are drawn first: the loader is host-side
    data work (its workers' reads are not the step's)."""
    batches = iter(trainer.loader)
    plan = [[next(batches) for _ in range(trainer.accumulation)] for _ in range(n)]
    for micro in plan:
        yield trainer.optimizer_step(micro, preempt_requested=False, encode_autocast=contextlib.nullcontext())
        trainer.state.step += 1


@pytest.mark.parametrize("backend,precision", [("ddp", "fp32"), ("ddp", "fp16"), ("fsdp", "bf16")])
def test_the_optimizer_step_reads_nothing_back(tmp_path, two_shards, backend, precision):
    with one_rank_group(backend):
        trainer = in_process_trainer(tmp_path, two_shards, f"backend={backend}", f"parallel.precision={precision}",
                           "stage.micro_batch=2", "fault.nan_loss_at_steps=[2]")  # accumulation 2, one skip
        assert trainer.accumulation == 2
        steps = _steps(trainer, 4)
        first = next(steps)  # draws the batches
        with HostReads() as mode:
            outcomes = [first, *steps]
        assert mode.reads == [], f"{len(mode.reads)} host reads in 4 steps: {sorted(set(mode.reads))}"
        assert [float(o.skipped) for o in outcomes] == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_a_skipped_step_leaves_weights_moments_and_ema_bit_identical(tmp_path, two_shards, backend):
    with one_rank_group(backend):
        trainer = in_process_trainer(tmp_path, two_shards, f"backend={backend}", "parallel.precision=fp32",
                           "fault.nan_loss_at_steps=[1]")
        steps = _steps(trainer, 3)
        next(steps)

        def snapshot():
            local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().clone()  # noqa: E731
            params = {n: local(p) for n, p in trainer.engine.unet.named_parameters()}
            moments = {n: {k: local(v) for k, v in trainer.engine.optimizer.state[p].items()}
                       for n, p in trainer.engine.unet.named_parameters()}
            ema = {n: t.clone() for n, t in trainer.ema.shadow.items()}
            return params, moments, ema, trainer.ema.num_updates, trainer.engine.lr()

        before = snapshot()
        assert float(next(steps).skipped) == 1.0
        after = snapshot()
        for a, b in zip(before[:3], after[:3]):
            assert a.keys() == b.keys()
            for name in a:
                if isinstance(a[name], dict):
                    assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
                else:
                    assert torch.equal(a[name], b[name]), name
        assert before[3] == after[3] == 1  # the EMA counts updates, not steps
        assert after[4] != before[4]  # the LR schedule follows the step count (warm-up goes on)
        assert float(next(steps).skipped) == 0.0
        moved = snapshot()
        assert moved[3] == 2
        assert any(not torch.equal(before[0][n], moved[0][n]) for n in before[0])



def _overflowing_gradient_step(tmp_path, two_shards, backend) -> dict:
    """One step whose loss is finite but whose gradient overflows, as the loop runs it: what the engine
    reported and what the step left behind. Runs in a process of its own (train_helpers.in_fresh_process)."""
    import os

    from train.step import training_loss

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what torchrun sets and DeepSpeed reads
    with one_rank_group(backend, always=True):
        trainer = in_process_trainer(tmp_path, two_shards, f"backend={backend}", "parallel.precision=fp32",
                                     "parallel.channels_last=false", "stage.micro_batch=4")
        engine = trainer.engine
        weights = {n: p.detach().clone() for n, p in engine.unet.named_parameters()}
        lr = engine.lr()
        loss = training_loss(next(iter(trainer.loader)), engine.module, trainer.frozen, trainer.schedule,
                             trainer.env.device, trainer.generator, contextlib.nullcontext(), engine.autocast())
        loss = loss * 3e38  # a loss spike, still finite: the loss vote sees nothing
        engine.backward(loss, last_micro_batch=True)
        norm, skipped = engine.step(skip=torch.zeros(()))
        trainer._update_ema(skipped)
        trainer.stop_loader()
        return {"loss_finite": bool(torch.isfinite(loss)), "norm_finite": bool(torch.isfinite(norm)),
                "skipped": float(skipped), "ema_updates": trainer.ema.num_updates,
                "weights_kept": all(torch.equal(weights[n], p.detach()) for n, p in engine.unet.named_parameters()),
                "lr_steps": engine.scheduler.last_epoch, "lr_moved": engine.lr() != lr}


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_a_gradient_that_overflows_a_finite_loss_is_a_skip_on_every_backend(tmp_path, two_shards, backend):
    """DeepSpeed drops such an update itself; the step must still say so (the EMA and the non-finite counters
    read it), and the LR schedule must still follow the step count, as under DDP."""
    out = in_fresh_process(_overflowing_gradient_step, tmp_path, two_shards, backend)
    assert out == {"loss_finite": True, "norm_finite": False, "skipped": 1.0, "ema_updates": 0,
                   "weights_kept": True, "lr_steps": 1, "lr_moved": True}
