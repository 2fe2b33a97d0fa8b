"""Resuming a run on another number of ranks (a node lost, or more nodes given): model, optimiser and EMA
carry over exactly, the data goes on with what the old ranks had left, and it can change again."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from train import checkpoint as ckpt
from train_helpers import exported_unet, run_train, status
from test_train import shards  # noqa: F401 - the module's synthetic shards

BATCH = "stage.global_batch=12"  # 2 ranks x 2 x 3 micro-batches, 3 x 2 x 2, 1 x 2 x 6


def _overrides(shards, run_dir, backend, *extra):
    return [shards, f"run.dir={run_dir}", "parallel.precision=fp32", f"backend={backend}", BATCH, *extra]


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and any(k.startswith("model_ema.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP read by one in-process DDP rank
@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_resume_on_another_world_size(tmp_path, shards, backend):
    straight = tmp_path / "straight"
    run_train(tmp_path, _overrides(shards, straight, backend, "stage.steps=3"))
    broken = tmp_path / "broken"
    run_train(tmp_path, _overrides(shards, broken, backend, "fault.kill_after_checkpoint_at_step=3"), expect=None)
    assert (broken / "checkpoints" / "latest").read_text() == "step-3"

    # On 3 ranks, stopping where the checkpoint is: the exported raw and EMA weights are those the 2 ranks
    # had (gathered by the old run itself, not by the code that reshards), bit for bit.
    proc = run_train(tmp_path, _overrides(shards, broken, backend, "stage.steps=3"), nproc=3)
    assert "(written by 2 ranks) at step 3" in proc.stdout
    assert "unfinished shard groups of epoch(s) [0] dealt to the new streams" in proc.stdout
    _assert_equal(exported_unet(straight), exported_unet(broken))
    _assert_optimizer_resumed(tmp_path, shards, broken, backend)
    if backend == "ddp":
        return

    # Training on, on 3 ranks, then from their checkpoint on 1 rank (the data still in its carried part).
    run_train(tmp_path, _overrides(shards, broken, backend, "stage.steps=6"), nproc=3)
    meta = json.loads((broken / "checkpoints" / "step-6" / "meta.json").read_text())
    assert meta["world_size"] == 3 and meta["ema_layout"] == "dim0"
    loader = torch.load(broken / "checkpoints" / "step-6" / "rank-0.pt", weights_only=False)["loader"]
    assert any(len(cursor) > 3 for cursor in loader["cursors"])  # carried groups still being read
    proc = run_train(tmp_path, _overrides(shards, broken, backend, "stage.steps=8"), nproc=1)
    assert "(written by 3 ranks) at step 6" in proc.stdout
    got = status(broken)
    assert got["state"] == "finished" and got["step"] == 8 and math.isfinite(got["loss"])
    assert got["samples_seen"] == 8 * 12


def _assert_optimizer_resumed(tmp_path, shards, run_dir, backend):
    """The 2-rank checkpoint resumed by one in-process rank: Adam's moments and step counts are those in the
    checkpoint's files, read by DCP's own offline converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from train_helpers import in_process_trainer, one_rank_group

    dcp_to_torch_save(run_dir / "checkpoints" / "step-3" / "engine", tmp_path / "engine.pt")
    saved = torch.load(tmp_path / "engine.pt", weights_only=False)["optim"]["state"]
    copy = tmp_path / "in_process"
    shutil.copytree(run_dir, copy / "run")
    with one_rank_group(backend):
        trainer = in_process_trainer(copy, shards.split("=", 1)[1].strip("'"), "parallel.precision=fp32",
                                     f"backend={backend}")
        assert trainer.state.step == 3
        state = get_optimizer_state_dict(trainer.engine.unet, trainer.engine.optimizer)["state"]
    assert state.keys() == saved.keys() and len(state) > 100
    for name, moments in state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            value = moments[key].full_tensor() if hasattr(moments[key], "full_tensor") else moments[key]
            assert torch.equal(value, saved[name][key]), (name, key)


class _Engine:
    def __init__(self, resizable: bool):
        self.resizable = resizable


def test_deepspeed_checkpoints_are_refused_on_another_world_size(tmp_path):
    meta = {"world_size": 2, "engine": "DeepSpeedEngine", "resizable": False, "ema_layout": "zero3-flat"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    for engine in (_Engine(resizable=False), _Engine(resizable=True)):  # into DeepSpeed, or into FSDP2
        with pytest.raises(RuntimeError, match=r"\(DeepSpeedEngine\).*one ZeRO partition per rank.*Resume with 2 ranks"):
            ckpt.load_checkpoint(tmp_path, engine, world_size=4)
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "engine": "FSDPEngine", "resizable": True}))
    with pytest.raises(RuntimeError, match="only into DDP or FSDP2"):  # an FSDP2 checkpoint into DeepSpeed
        ckpt.load_checkpoint(tmp_path, _Engine(resizable=False), world_size=4)


def test_whole_ema_puts_dim0_pieces_back_together():
    full = {"a": torch.arange(10.0).reshape(5, 2), "b": torch.arange(3.0)}
    pieces = [{k: v.chunk(4)[r] if r < len(v.chunk(4)) else v[:0] for k, v in full.items()} for r in range(4)]
    whole = ckpt.whole_ema(pieces, "dim0")
    assert sorted(whole) == ["a", "b"] and all(torch.equal(whole[k], full[k]) for k in full)
    assert torch.equal(ckpt.whole_ema([full, {}], "replicated")["a"], full["a"])
