"""The trainer's own optimiser step on synthetic precomputed latents, against the bare UNet step of
bench/unet_step.py with the same settings, in the same run.

The trainer's step is `Trainer.optimizer_step` (forward, backward, the collective skip/pre-emption
vote, gradient clipping, fused AdamW with its device-side skip, EMA) plus the step-result bookkeeping
the loop does, with the previous step's results read back one step late as in `python -m train`.
On CUDA each step runs under `torch.cuda.set_sync_debug_mode("error")`: a host sync anywhere in it
raises, so a row with `syncs: none` proves the step never waits for the device. The time the loop
spends in the one-step-late read is reported too (≈ 0 when the device is never starved).

    python bench/trainer_step.py --device cpu --arch tiny --latent 8 --batch 2
    python bench/trainer_step.py --device cuda --arch sd-v1 --latent 64 --batch 32 --compile --channels-last
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.unet_step import Result, measure, oom_marks, time_steps, write_report  # noqa: E402
from train.flops import peak_tflops, unet_train_flops_per_image  # noqa: E402


@dataclass
class TrainerResult(Result):
    """bench/unet_step.py's row for the trainer's step (impl "trainer"), and what only it has."""

    backend: str = "ddp"
    read_wait_ms: float = float("nan")  # per step, in the one-step-late read
    syncs: str = "not checked (CPU)"
    bare_img_per_s: float = float("nan")  # bench/unet_step.py's step, same settings, same run


def build_trainer(args, backend: str, latent: int, batch: int, run_dir: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.distributed import DistEnv
    from train.main import CONF_DIR, to_dataclass
    from train.trainer import Trainer

    overrides = [f"model.arch={args.arch}", f"backend={backend}", f"parallel.precision={args.dtype}",
                 f"parallel.compile={str(args.compile).lower()}",
                 f"parallel.channels_last={str(args.channels_last).lower()}",
                 f"model.activation_checkpointing={args.ac}", f"stage.micro_batch={batch}",
                 f"stage.global_batch={batch}", f"stage.data.resolution={latent * 8}",
                 # Never read: the batches are made here. The loader only expands the pattern.
                 "stage.data.shards='/nonexistent/{00000..00001}.tar'", "stage.data.latents=true",
                 "stage.data.context=true", f"cluster.device={args.device}", "cluster.gpus_per_node=1",
                 f"run.dir={run_dir}", "tracking.wandb_mode=disabled", "tracking.progress_bar=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    return Trainer(to_dataclass(cfg), env, OmegaConf.to_container(cfg, resolve=True))


@contextlib.contextmanager
def one_rank_group(backend: str, device: str):
    """FSDP2 needs a process group, even of one rank (DDP without one is the plain module)."""
    import torch.distributed as dist

    if backend != "fsdp":
        yield
        return
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1, store=dist.HashStore(),
                            **({"device_id": torch.device("cuda", 0)} if device == "cuda" else {}))
    try:
        yield
    finally:
        dist.destroy_process_group()


def synthetic_batch(trainer, latent: int, batch: int) -> dict:
    """What the loader yields for precomputed shards, in pinned memory on CUDA as the trainer's loader."""
    gen = torch.Generator().manual_seed(0)
    ctx_dim = trainer.sd_cfg.unet.context_dim
    out = {"latent_mean": torch.randn(batch, 4, latent, latent, generator=gen),
           "latent_std": torch.full((batch, 4, latent, latent), 0.05),
           "context": torch.randn(batch, 77, ctx_dim, generator=gen)}
    return {k: v.pin_memory() for k, v in out.items()} if trainer.env.device.type == "cuda" else out


def measure_trainer(res: TrainerResult, args, flops_per_img: float, peak: float | None) -> TrainerResult:
    from train.step_results import StepCounters

    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        start = time.perf_counter()
        trainer = build_trainer(args, res.backend, res.latent, res.batch, Path(tmp))
        sync()
        res.build_s = time.perf_counter() - start
        batch = synthetic_batch(trainer, res.latent, res.batch)
        counters = StepCounters(trainer.env.device)
        encode_autocast = (torch.autocast(trainer.env.device.type, dtype=trainer.engine.dtype)
                           if trainer.engine.dtype != torch.float32 else contextlib.nullcontext())
        pending, waits = None, []

        def step(check_syncs: bool):
            nonlocal pending
            if check_syncs:
                torch.cuda.set_sync_debug_mode("error")
            try:
                outcome = trainer.optimizer_step([batch] * trainer.accumulation, False, encode_autocast)
                record = counters.record(trainer.state.step, outcome, trainer.engine.lr(), False, 1)
            finally:
                if check_syncs:
                    torch.cuda.set_sync_debug_mode("default")
            trainer.state.step += 1
            if pending is not None:
                start = time.perf_counter()
                pending.read.result()  # the loop's one deliberate wait: for the step before this one
                waits.append(time.perf_counter() - start)
            pending = record

        try:
            # Warm-up steps (compilation, lazy optimiser state) run without the sync check.
            start = time.perf_counter()
            step(check_syncs=False)  # the first warm-up step, timed on its own: it compiles
            sync()
            res.first_step_s = time.perf_counter() - start
            per_step = time_steps(lambda: step(check_syncs=cuda), args.steps, max(args.warmup - 1, 0), args.device,
                                  warmup_step=lambda: step(check_syncs=False))
            res.syncs = "none" if cuda else res.syncs
        except RuntimeError as err:
            if "synchroniz" not in str(err):
                raise
            res.syncs = f"SYNC: {str(err).splitlines()[0][:100]}"
            res.status = "host sync in the step"
            return res
        res.record_rates(per_step, flops_per_img, peak, args.device)
        res.read_wait_ms = sum(waits[-args.steps:]) / args.steps * 1e3
        del trainer
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=["tiny", "sd-v1"], default="sd-v1")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--batch", default="32", help="micro-batch sizes")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--ac", default="none", choices=["none", "full", "selective"])
    p.add_argument("--backend", default="ddp",
                   help="ddp and/or fsdp (comma-separated); FSDP2 runs on a one-rank process group, which "
                        "shows its own overhead (hooks, per-block all-gathers of one shard, contiguous weights)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    args = p.parse_args(argv)
    from models import configs

    cfg = (configs.tiny() if args.arch == "tiny" else configs.sd_v1()).unet
    flops = unet_train_flops_per_image(cfg, args.latent)
    peak = peak_tflops(args.device, args.dtype)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {flops / 1e9:.1f} GFLOP per image", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    bare: dict[int, float] = {}  # batch -> the bare UNet step's img/s (the same for every backend: measured once)
    for backend, batch in itertools.product(args.backend.split(","), map(int, args.batch.split(","))):
        res = TrainerResult("trainer", args.arch, args.latent, batch, args.dtype, args.compile, args.channels_last,
                            args.ac, backend=backend)
        with oom_marks(res, args.device):
            with one_rank_group(backend, args.device):
                measure_trainer(res, args, flops, peak)
            if batch not in bare:
                bare[batch] = measure(Result("ours", args.arch, args.latent, batch, args.dtype, args.compile,
                                             args.channels_last, args.ac),
                                      cfg, args.device, args.steps, args.warmup, flops, peak).img_per_s
            res.bare_img_per_s = bare[batch]
        rows.append(res)
        print(json.dumps(asdict(res)), flush=True)
    lines = ["| backend | latent | batch | dtype | compile | ch-last | AC | ms/step | img/s | MFU | peak GiB | read wait ms "
             "| bare UNet step img/s | trainer / bare | syncs | status |", "|" + "---|" * 16]
    for r in rows:
        lines.append(f"| {r.backend} | {r.latent} | {r.batch} | {r.dtype} | {r.compile} | {r.channels_last} | {r.ac} "
                     f"| {r.ms_per_step:.1f} | {r.img_per_s:.2f} | {r.mfu:.3f} | {r.peak_mem_gib:.1f} "
                     f"| {r.read_wait_ms:.2f} | {r.bare_img_per_s:.2f} | {r.img_per_s / r.bare_img_per_s:.3f} "
                     f"| {r.syncs} | {r.status} |")
    md = f"device: {name}, torch {torch.__version__}\n\n" + "\n".join(lines) + "\n"
    write_report(args.out, "trainer_step", md, name, rows)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
