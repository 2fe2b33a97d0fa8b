"""One rank, under torchrun (CPU, gloo), resuming a checkpoint that more ranks wrote, for
tests/test_train_resize.py:

    python -m torch.distributed.run --nproc-per-node=1 tests/resume_moments_worker.py RUN_COPY SHARDS BACKEND OUT

Builds the real Trainer on the copy (it resumes from the checkpoint there) and saves Adam's moments and step
counts per parameter name, as full tensors, to OUT for the test to compare with the checkpoint's files. A
process of its own: DeepSpeed keeps its process groups in module globals, so a second engine built in the
test runner would find the first one's destroyed group."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_helpers

from train.distributed import init_distributed  # noqa: E402
from train_helpers import in_process_trainer  # noqa: E402


def dcp_moments(engine) -> dict[str, dict[str, torch.Tensor]]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(engine.unet, engine.optimizer)["state"]
    return {name: {key: value.full_tensor() if hasattr(value, "full_tensor") else value
                   for key, value in moments.items()} for name, moments in state.items()}


def deepspeed_moments(engine) -> dict[str, dict[str, torch.Tensor]]:
    from deepspeed.utils import safe_get_full_optimizer_state

    steps = {float(group["step"]) for group in engine.optimizer.optimizer.state.values()}
    assert len(steps) == 1, f"the partitions disagree on Adam's step: {steps}"
    step = torch.tensor(steps.pop())
    return {name: {"exp_avg": safe_get_full_optimizer_state(p, "exp_avg").float().cpu(),
                   "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").float().cpu(), "step": step}
            for name, p in engine.unet.named_parameters()}


def main(run_copy: Path, shards: str, backend: str, out: Path) -> None:
    name, _, zero = backend.partition("-")
    env = init_distributed("cpu", single_needs_group=name == "fsdp")
    trainer = in_process_trainer(run_copy, shards, "parallel.precision=fp32", f"backend={name}",
                                 *([f"parallel.zero_stage={zero}"] if zero else []), env=env)
    assert trainer.state.step == 3, trainer.state.step
    torch.save(deepspeed_moments(trainer.engine) if zero else dcp_moments(trainer.engine), out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
