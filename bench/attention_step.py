"""SD v1's attention calls alone, forward + backward, under each SDPA kernel: which one to pin per head dim.

SD v1's heads are 40, 80 and 160 wide (320 / 640 / 1280 channels over 8 heads). At 512 px the
self-attention over 64x64 = 4,096 tokens with head dim 40 carries most of the UNet's attention FLOPs,
and FlashAttention pads a head dim of 40 to 64 inside the kernel; cuDNN's fused attention takes
multiples of 8. Only a measurement on the card says which wins, so this times every attention call
the UNet makes (shapes recorded from a forward of the real model, tensors laid out as the model lays
them out) under torch's own choice ("sdpa") and each pinned kernel (models/attention.py), and sums
them into milliseconds of attention per UNet step.

    python bench/attention_step.py --device cuda --latent 32,64 --batch 32
    python bench/attention_step.py --device cpu --arch tiny --latent 8 --batch 2      # CPU dry run

Writes attention_step.{json,md} and best.json (the fastest pinned kernel and its saving against
"sdpa") under --out. FLOPs: 4·n·m·d per head forward, x3 for forward + backward (the UNet count's
convention; FlashAttention's backward recomputes the scores, so its true work is ~3.5x).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.unet_step import time_steps, write_report  # noqa: E402
from models import configs  # noqa: E402
from models.attention import SDPA_BACKENDS as KERNELS  # noqa: E402
from models.attention import attention  # noqa: E402
from models.unet import CrossAttention, UNetModel  # noqa: E402

@dataclass(frozen=True, order=True)
class Call:
    """One attention call's shape per image: `tokens` queries over `keys` keys, `heads` x `head_dim`."""

    tokens: int
    keys: int
    heads: int
    head_dim: int

    @property
    def kind(self) -> str:
        return "self" if self.tokens == self.keys else "cross"

    def train_flops(self, batch: int) -> float:
        return 3.0 * 4.0 * batch * self.heads * self.tokens * self.keys * self.head_dim


def attention_calls(cfg: configs.UNetConfig, latent: int) -> Counter[Call]:
    """Every attention call of one UNet forward at `latent` x `latent`, counted by shape (meta device)."""
    calls: Counter[Call] = Counter()

    def record(module: CrossAttention, args, kwargs) -> None:
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        keys = x.shape[1] if context is None else context.shape[1]
        calls[Call(x.shape[1], keys, module.heads, x.shape[2] // module.heads)] += 1

    with torch.device("meta"):
        unet = UNetModel(cfg)
        for module in unet.modules():
            if isinstance(module, CrossAttention):
                module.register_forward_pre_hook(record, with_kwargs=True)
        unet(torch.empty(1, cfg.in_channels, latent, latent), torch.zeros(1, dtype=torch.long),
             torch.empty(1, 77, cfg.context_dim))
    return calls


@dataclass
class Row:
    latent: int
    batch: int
    call: Call
    count: int  # calls per UNet forward
    ms: dict[str, float] = field(default_factory=dict)  # kernel -> forward + backward ms per call
    status: dict[str, str] = field(default_factory=dict)


def time_call(call: Call, batch: int, kernel: str, device: str, dtype: torch.dtype, steps: int, warmup: int) -> float:
    """ms for one forward + backward of `call` at `batch`, q/k/v laid out as CrossAttention makes them
    (a (batch, tokens, heads * head_dim) projection viewed as heads and transposed)."""
    gen = torch.Generator(device).manual_seed(0)

    def heads(tokens: int) -> torch.Tensor:
        t = torch.randn(batch, tokens, call.heads * call.head_dim, device=device, dtype=dtype, generator=gen)
        return t.view(batch, tokens, call.heads, call.head_dim).transpose(1, 2).requires_grad_()

    q, k, v = heads(call.tokens), heads(call.keys), heads(call.keys)
    grad = torch.randn(batch, call.heads, call.tokens, call.head_dim, device=device, dtype=dtype, generator=gen)

    def step() -> None:
        attention(q, k, v, kernel).backward(grad)
        q.grad = k.grad = v.grad = None

    return 1e3 * time_steps(step, steps, warmup, device)


def totals(rows: list[Row], latent: int) -> dict[str, float]:
    """ms of attention per UNet training step (forward + backward, every call) under each kernel that ran
    every call, and under the fastest kernel for each head dim ("best per head dim")."""
    mine = [r for r in rows if r.latent == latent]
    out = {k: sum(r.count * r.ms[k] for r in mine) for k in KERNELS if mine and all(k in r.ms for r in mine)}
    best = 0.0
    for dim in {r.call.head_dim for r in mine}:
        same = [r for r in mine if r.call.head_dim == dim]
        ran = [k for k in KERNELS if all(k in r.ms for r in same)]
        if not ran:
            return out
        best += min(sum(r.count * r.ms[k] for r in same) for k in ran)
    if mine:
        out["best per head dim"] = best
    return out


def best_pinned(rows: list[Row], latents: list[int]) -> dict:
    """The pinned kernel with the least attention time summed over `latents` (only kernels that ran every
    call count), and its saving against torch's own choice."""
    per_latent = [totals(rows, latent) for latent in latents]
    sums = {k: sum(t[k] for t in per_latent) for k in KERNELS if all(k in t for t in per_latent)}
    pinned = {k: ms for k, ms in sums.items() if k != "sdpa"}
    if not pinned or "sdpa" not in sums:
        return {"kernel": "sdpa", "saving": 0.0, "ms": sums}
    kernel = min(pinned, key=pinned.get)
    return {"kernel": kernel, "saving": 1.0 - pinned[kernel] / sums["sdpa"], "ms": sums}


def markdown(rows: list[Row], latents: list[int], name: str) -> str:
    lines = [f"device: {name}", "",
             "| latent | batch | attention | tokens x keys | heads x dim | calls/fwd | "
             + " | ".join(f"{k} ms (TFLOP/s)" for k in KERNELS) + " |",
             "|" + "---|" * (6 + len(KERNELS))]
    for r in rows:
        cells = []
        for k in KERNELS:
            if k in r.ms:
                cells.append(f"{r.ms[k]:.3f} ({r.call.train_flops(r.batch) / r.ms[k] / 1e9:.1f})")
            else:
                cells.append(r.status.get(k, "-"))
        lines.append(f"| {r.latent} | {r.batch} | {r.call.kind} | {r.call.tokens} x {r.call.keys} | "
                     f"{r.call.heads} x {r.call.head_dim} | {r.count} | " + " | ".join(cells) + " |")
    lines += ["", "ms of attention per UNet training step (forward + backward, all calls):", ""]
    for latent in latents:
        batch = next(r.batch for r in rows if r.latent == latent)
        t = totals(rows, latent)
        lines.append(f"- latent {latent}, batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=["tiny", "sd-v1"], default="sd-v1")
    p.add_argument("--latent", default="32,64")
    p.add_argument("--batch", type=int, default=32, help="micro-batch (the UNet step's)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    args = p.parse_args(argv)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = (configs.tiny() if args.arch == "tiny" else configs.sd_v1()).unet
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    name += f", torch {torch.__version__}, {args.dtype}"
    latents = [int(x) for x in args.latent.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    start = time.perf_counter()
    for latent in latents:
        for call, count in sorted(attention_calls(cfg, latent).items()):
            row = Row(latent, args.batch, call, count)
            for kernel in KERNELS:
                try:
                    row.ms[kernel] = time_call(call, args.batch, kernel, args.device, dtype, args.steps, args.warmup)
                except torch.OutOfMemoryError:
                    row.status[kernel] = "OOM"
                except RuntimeError as err:  # a pinned kernel that cannot take this shape / device
                    row.status[kernel] = "no kernel" if "has no kernel" in str(err) else f"error: {str(err)[:60]}"
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(markdown([row], [], name).splitlines()[-4], flush=True)
    best = best_pinned(rows, latents)
    md = markdown(rows, latents, name) + (
        f"\nfastest pinned kernel over all latents: {best['kernel']}, "
        f"{100 * best['saving']:+.1f}% attention time against torch's own choice\n")
    write_report(args.out, "attention_step", md, name, rows, best=best)
    (args.out / "best.json").write_text(json.dumps(best))
    print("\n" + md + f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
