"""Resuming a run on another number of ranks (a node lost, or more nodes given), on every backend: weights,
optimiser and EMA carry over exactly, the data goes on with what the old ranks had left, and it can change
again."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from train import checkpoint as ckpt
from train_helpers import REPO, exported_unet, free_port, run_train, status, train_env
from test_train import shards  # noqa: F401 - the module's synthetic shards

BATCH = "stage.global_batch=12"  # 2 ranks x 2 x 3 micro-batches, 3 x 2 x 2, 1 x 2 x 6


def _overrides(shards, run_dir, backend, *extra):
    name, _, zero = backend.partition("-")
    return [shards, f"run.dir={run_dir}", "parallel.precision=fp32", f"backend={name}", BATCH,
            *([f"parallel.zero_stage={zero}"] if zero else []), *extra]


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and any(k.startswith("model_ema.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's offline converter, run with no group
@pytest.mark.parametrize("backend", ["fsdp", "ddp", "deepspeed-2", "deepspeed-3"])
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
    # DeepSpeed's partitions went through its universal format, converted once beside the original.
    assert (broken / "checkpoints" / "step-3" / "engine" / "ds-universal").is_dir() == backend.startswith("deepspeed")
    _assert_optimizer_resumed(tmp_path, shards, broken, backend)
    if backend in ("ddp", "deepspeed-2"):
        return

    # Training on, on 3 ranks, then from their checkpoint on 1 rank (the data still in its carried part).
    run_train(tmp_path, _overrides(shards, broken, backend, "stage.steps=6"), nproc=3)
    meta = json.loads((broken / "checkpoints" / "step-6" / "meta.json").read_text())
    assert meta["world_size"] == 3 and meta["ema_layout"] == {"fsdp": "dim0", "deepspeed-3": "flat"}[backend]
    loader = torch.load(broken / "checkpoints" / "step-6" / "rank-0.pt", weights_only=False)["loader"]
    assert any(len(cursor) > 3 for cursor in loader["cursors"])  # carried groups still being read
    proc = run_train(tmp_path, _overrides(shards, broken, backend, "stage.steps=8"), nproc=1)
    assert "(written by 3 ranks) at step 6" in proc.stdout
    got = status(broken)
    assert got["state"] == "finished" and got["step"] == 8 and math.isfinite(got["loss"])
    assert got["samples_seen"] == 8 * 12


def _assert_optimizer_resumed(tmp_path, shards, run_dir, backend):
    """The 2-rank checkpoint resumed by one rank (tests/resume_moments_worker.py): Adam's moments and step
    counts are those in the checkpoint's files, read by the backend's own offline reader (DCP's converter;
    DeepSpeed's zero_to_fp32 merge, a path apart from the universal checkpoint the resume goes through)."""
    engine_dir = run_dir / "checkpoints" / "step-3" / "engine"
    saved = (_saved_deepspeed_moments(engine_dir / "ds") if backend.startswith("deepspeed")
             else _saved_dcp_moments(engine_dir, tmp_path))
    copy = tmp_path / "in_process"
    shutil.copytree(run_dir, copy / "run")
    out = tmp_path / "resumed_moments.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}",
           str(REPO / "tests" / "resume_moments_worker.py"), str(copy), shards.split("=", 1)[1].strip("'"),
           backend, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    state = torch.load(out, weights_only=False)
    assert state.keys() == saved.keys() and len(state) > 100
    for param, moments in state.items():
        assert moments.keys() == saved[param].keys(), param
        for key in moments:
            assert torch.equal(moments[key], saved[param][key]), (param, key)


def _saved_dcp_moments(engine_dir, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(engine_dir, tmp_path / "engine.pt")
    return torch.load(tmp_path / "engine.pt", weights_only=False)["optim"]["state"]


def _saved_deepspeed_moments(ds_dir):
    """Each rank's flat Adam moments, put together into per-parameter tensors by zero_to_fp32's merge (which
    does this for the fp32 weights), and the step count every partition holds."""
    from deepspeed.utils import zero_to_fp32 as z

    models = z.parse_model_states(z.get_model_state_files(str(ds_dir)))
    ranks = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in z.get_optim_files(str(ds_dir))]
    zero3 = ranks[0]["zero_stage"] == 3
    states = [r["optimizer_state_dict" if zero3 else "base_optimizer_state"]["state"] for r in ranks]
    steps = {float(group["step"]) for state in states for group in state.values()}
    assert len(steps) == 1, f"the partitions disagree on Adam's step: {steps}"
    trainable = {name for shapes in models[0].param_shapes for name in shapes}
    step = torch.tensor(steps.pop())
    out = {name: {"step": step} for name in trainable}
    for key in ("exp_avg", "exp_avg_sq"):
        if zero3:
            flat = [[state[i][key] for i in sorted(state)] for state in states]
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(len(ranks), flat, models, False)
        else:  # ZeRO-2's optimiser partitions keep the last rank's padding, which its fp32 copy drops
            flat = [[state[i][key][:state[i][key].numel() - r["group_paddings"][i]] for i in sorted(state)]
                    for state, r in zip(states, ranks)]
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(len(ranks), flat, models, False,
                                                                  ranks[0]["param_alignment_paddings"])
        for name, value in z.to_torch_tensor(merged).items():
            if name in trainable:
                out[name][key] = value.clone()
    return out


class _Engine:
    def __init__(self, kind: str):
        self._kind = kind

    def kind(self) -> str:
        return self._kind


def test_a_checkpoint_resumes_only_into_its_own_backend(tmp_path):
    meta = {"world_size": 2, "engine": "DeepSpeedEngine(ZeRO-3)", "ema_layout": "flat"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    for other in ("FSDPEngine", "DeepSpeedEngine(ZeRO-2)"):
        for world in (2, 4):
            with pytest.raises(RuntimeError, match=r"written by DeepSpeedEngine\(ZeRO-3\), this run is"):
                ckpt.load_checkpoint(tmp_path, _Engine(other), world_size=world)
    (tmp_path / "meta.json").write_text(json.dumps({"world_size": 2}))  # from before resizing existed
    with pytest.raises(RuntimeError, match="predates resuming on another world size"):
        ckpt.load_checkpoint(tmp_path, _Engine("FSDPEngine"), world_size=4)


def test_whole_ema_puts_the_pieces_back_together():
    full = {"a": torch.arange(10.0).reshape(5, 2), "b": torch.arange(3.0)}
    shapes = {k: v.shape for k, v in full.items()}
    dim0 = [{k: v.chunk(4)[r] if r < len(v.chunk(4)) else v[:0] for k, v in full.items()} for r in range(4)]
    # ZeRO-3: equal slices of the flattened tensor, the last padded (with anything: it is never read).
    flat = [{k: torch.cat([v.flatten(), torch.full((3,), 7.0)])[r * 3:(r + 1) * 3] for k, v in full.items()}
            for r in range(4)]
    for pieces, layout in ((dim0, "dim0"), (flat, "flat"), ([full, {}], "replicated")):
        whole = ckpt.whole_ema(pieces, layout, shapes)
        assert sorted(whole) == ["a", "b"] and all(torch.equal(whole[k], full[k]) for k in full), layout
