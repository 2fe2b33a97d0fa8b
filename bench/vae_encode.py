"""The frozen VAE encoder's forward alone, as `python -m data precompute` runs it (and as v1-1_256's
training loop runs it): images/s, TFLOP/s and MFU per resolution and batch, eager and channels-last.

The cost planner assumes the encoder runs at the UNet training step's MFU when it prices precomputed
latents (tools/plan_cost.py); this measures the encoder's own.

    python bench/vae_encode.py --device cuda --resolution 256,512 --batch 32,64 --dtype bf16,fp32
    python bench/vae_encode.py --device cpu --arch tiny --resolution 64 --batch 2     # CPU dry run

Writes vae_encode.{json,md} under --out.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.unet_step import StepRates, oom_marks, time_steps, write_report  # noqa: E402
from models import configs  # noqa: E402
from models.vae import AutoencoderKL  # noqa: E402
from train.flops import peak_tflops, vae_encode_flops_per_image  # noqa: E402

# bf16: autocast (float32 weights, GroupNorm in float32). No fp16: SD's VAE overflows in it at 512 px.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row(StepRates):
    resolution: int
    batch: int  # images per encoder call (ms_per_step: one call)
    dtype: str
    channels_last: bool


def measure(row: Row, vae: AutoencoderKL, device: str, steps: int, warmup: int, peak: float | None) -> Row:
    dtype = DTYPES[row.dtype]
    vae = vae.to(device, memory_format=torch.channels_last if row.channels_last else torch.contiguous_format)
    x = torch.randn(row.batch, 3, row.resolution, row.resolution, device=device)
    if row.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def encode():
        # bf16 as precompute and the training loop run it: autocast over float32 weights.
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            posterior = vae.encode(x)
        return posterior.mean, posterior.std  # what precompute keeps

    row.record_rates(time_steps(encode, steps, warmup, device), vae_encode_flops_per_image(vae.cfg, row.resolution),
                     peak, device)
    return row


def to_markdown(rows: list[Row], name: str) -> str:
    lines = [f"device: {name}", "", "| resolution | batch | dtype | channels-last | ms/batch | img/s | TFLOP/s | MFU "
             "| peak GiB | status |", "|" + "---|" * 10]
    lines += [f"| {r.resolution} | {r.batch} | {r.dtype} | {r.channels_last} | {r.ms_per_step:.1f} | "
              f"{r.img_per_s:.1f} | {r.tflops:.1f} | {r.mfu:.3f} | {r.peak_mem_gib:.1f} | {r.status} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=["tiny", "sd-v1"], default="sd-v1")
    p.add_argument("--resolution", default="256,512")
    p.add_argument("--batch", default="32,64")
    p.add_argument("--dtype", default="bf16", help=f"comma list of {', '.join(DTYPES)} (precompute's --dtype "
                   "bfloat16 / float32)")
    p.add_argument("--channels-last", choices=["no", "yes", "both"], default="both")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    args = p.parse_args(argv)

    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = (configs.tiny() if args.arch == "tiny" else configs.sd_v1()).vae
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).eval().requires_grad_(False)
    vae.decoder = None  # the encoder is all precompute runs; the decoder is half the weights
    dtypes = args.dtype.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"--dtype {args.dtype}: choose from {', '.join(DTYPES)}")
    peaks = {d: peak_tflops(args.device, d) for d in dtypes}  # each row's MFU against its own dtype's peak
    name = (torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads")
    name += f", torch {torch.__version__}, peak " + ", ".join(f"{d} {peaks[d]}" for d in dtypes) + " TFLOP/s"
    layouts = {"no": [False], "yes": [True], "both": [False, True]}[args.channels_last]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for res, batch, dtype, cl in itertools.product(map(int, args.resolution.split(",")),
                                                   map(int, args.batch.split(",")), dtypes, layouts):
        row = Row(res, batch, dtype, cl)
        with oom_marks(row, args.device):
            measure(row, vae, args.device, args.steps, args.warmup, peaks[dtype])
        rows.append(row)
        print(to_markdown([row], name).splitlines()[-1], flush=True)
    md = to_markdown(rows, name)
    write_report(args.out, "vae_encode", md, name, rows)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
