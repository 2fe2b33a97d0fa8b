"""One rank of tests/test_sample_weights.py's check, run under torchrun (CPU, gloo):

    python -m torch.distributed.run --nproc-per-node=2 tests/sample_weights_worker.py SHARDS OUT BACKEND...

For each backend: a Trainer takes three steps (the EMA now lags the weights); a forward pass inside
`Trainer._weights_for_samples` must be the EMA model's (a plain UNet loaded with the gathered average,
on rank 0), and the forward passes before and after it, and the raw weights, bit-identical. On more than
one rank this is where gathered copies would show: FSDP2 reuses blocks left unsharded by a forward pass,
ZeRO-3 its persistent parameters; a stale copy gives the raw model inside, or the average after."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_helpers

from models.stable_diffusion import build_models  # noqa: E402
from train.distributed import init_distributed  # noqa: E402
from train_helpers import in_process_trainer  # noqa: E402

BACKENDS = {"ddp": ("backend=ddp",), "fsdp": ("backend=fsdp", "parallel.reshard_after_forward=false"),
            "zero2": ("backend=deepspeed", "parallel.zero_stage=2"),
            "zero3": ("backend=deepspeed", "parallel.zero_stage=3")}


def train_steps(trainer, steps: int) -> None:
    batches = iter(trainer.loader)
    for _ in range(steps):
        trainer.optimizer_step([next(batches) for _ in range(trainer.accumulation)], preempt_requested=False,
                               encode_autocast=contextlib.nullcontext())
        trainer.state.step += 1


@torch.no_grad()
def forward(trainer, x, t, context) -> torch.Tensor:
    trainer.engine.unet.eval()
    try:
        with trainer.engine.autocast():
            return trainer.engine.module(x, t, context).float()
    finally:
        trainer.engine.unet.train()


def raw_weights(trainer) -> dict[str, torch.Tensor]:
    local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().clone()  # noqa: E731
    with trainer.engine.weights_edited():  # (FSDP2: the shards, not the tensors a forward pass gathered)
        return {n: local(p) for n, p in trainer.engine.named_trainable().items()}


def check(trainer) -> None:
    train_steps(trainer, 3)
    gen = torch.Generator().manual_seed(0)  # the same inputs on every rank
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 77, trainer.sd_cfg.unet.context_dim, generator=gen)
    raw = raw_weights(trainer)
    average = trainer.engine.full_ema_state_dict(trainer.ema.shadow)  # collective; rank 0 gets it
    before = forward(trainer, x, t, context)  # leaves gathered weights behind, where a backend keeps them
    with trainer._weights_for_samples() as weights:
        inside = forward(trainer, x, t, context)
    after = forward(trainer, x, t, context)
    assert weights == "EMA weights at step 3", weights
    assert torch.equal(after, before), "the forward pass after the samples is not the one before them"
    assert all(torch.equal(raw[n], v) for n, v in raw_weights(trainer).items()), "raw weights changed"
    if average is not None:
        reference = build_models(trainer.sd_cfg).unet.eval()
        reference.load_state_dict(average)
        with torch.no_grad():
            torch.testing.assert_close(inside, reference(x, t, context), rtol=1e-5, atol=1e-5)
        # The average is another model, not a rounding of this one.
        assert (inside - before).abs().max() > 1e-3


def main(shards: str, out: Path, backends: list[str]) -> None:
    env = init_distributed("cpu")
    for backend in backends:
        trainer = in_process_trainer(out / backend, shards, *BACKENDS[backend], "parallel.precision=fp32",
                                     "ema.max_decay=0.5", "optim.warmup_steps=1", "optim.lr=1e-2", env=env)
        check(trainer)
        if env.is_main:
            print(f"{backend}: samples drawn with the EMA, raw weights exact after", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
