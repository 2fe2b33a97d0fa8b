"""UNet training step (forward + backward + AdamW): ours against diffusers' UNet2DConditionModel on the
same config, the same inputs, the same machine, in the same run, interleaved.

    python bench/unet_step.py --device cpu --arch tiny --latent 8 --batch 2          # CPU, tiny
    python bench/unet_step.py --device cuda --arch sd-v1 --latent 32,64 --batch 8,32 --dtype bf16 --compile both

Prints a table (img/s, ms/step, TFLOP/s, MFU, peak memory, ratio ours/diffusers) and writes it as
JSON and Markdown under --out. FLOPs per image come from torch.utils.flop_counter on the forward,
times 3 for forward + backward (the convention MosaicML and the issue tracker use).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import configs  # noqa: E402
from models.adapters import diffusers_unet  # noqa: E402
from models.attention import SDPA_BACKENDS, SDPA_KERNELS  # noqa: E402
from models.unet import UNetModel  # noqa: E402
from train.flops import peak_tflops, unet_train_flops_per_image  # noqa: E402
from train.parallel.base import compile_blocks, compile_in_place  # noqa: E402


@dataclass(kw_only=True)
class StepRates:
    """What a timed row records (the benches' shared columns); the row itself says what ran, and its
    `batch` how many images one timed call processes."""

    ms_per_step: float = float("nan")
    img_per_s: float = float("nan")
    tflops: float = float("nan")
    mfu: float = float("nan")
    peak_mem_gib: float = float("nan")
    status: str = "ok"

    def record_rates(self, seconds_per_step: float, flops_per_img: float, peak: float | None, device: str) -> None:
        self.ms_per_step = seconds_per_step * 1e3
        self.img_per_s = self.batch / seconds_per_step
        self.tflops = flops_per_img * self.img_per_s / 1e12
        self.mfu = self.tflops / peak if peak else float("nan")
        if device == "cuda":
            self.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30


@dataclass
class Result(StepRates):
    impl: str
    arch: str
    latent: int
    batch: int
    dtype: str
    compile: bool
    channels_last: bool
    ac: str
    compile_mode: str = "default"
    attention: str = "sdpa"  # models/attention.py backend; diffusers runs under the same pinned SDPA kernel
    # Where a row's wall time goes besides the timed steps: building the model on the device, and the first
    # step (compiling, when compiled). On the H200 a compiled row took ~2.3 min in all (2026-12-04), which
    # decides how many rows one device call can measure.
    build_s: float = float("nan")
    first_step_s: float = float("nan")

    def setting(self) -> tuple:
        """What was run, but for the implementation and the micro-batch: rows compared or fitted together."""
        return (self.arch, self.latent, self.dtype, self.compile, self.compile_mode, self.channels_last, self.ac,
                self.attention)


def write_report(out: Path, stem: str, md: str, device: str, rows: list, **extra) -> None:
    """`<stem>.md` and `<stem>.json` ({"device", "rows", **extra}) under `out`."""
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"device": device, "rows": [asdict(r) for r in rows], **extra},
                                                 indent=1))


@contextlib.contextmanager
def oom_marks(row: StepRates, device: str):
    """A configuration that runs out of memory is a row with status "OOM", not the end of the run; the
    cache is emptied after every row so the next starts from what is really free."""
    try:
        yield
    except torch.OutOfMemoryError:
        row.status = "OOM"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def time_steps(step, steps: int, warmup: int, device: str, warmup_step=None) -> float:
    """Seconds per step over `steps` calls of `step`, after `warmup` calls of `warmup_step` (default:
    `step`); the device is synchronised around the timed calls and its peak memory counter reset first."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        (warmup_step or step)()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def build(impl: str, cfg: configs.UNetConfig, device: str, channels_last: bool, compile_: bool, ac: str,
          mode: str = "default", attention: str = "sdpa"):
    mode = None if mode == "default" else mode
    torch.manual_seed(0)
    if impl in ("ours", "ours-whole"):
        with torch.device(device):  # initialise on the device: a CPU init of 860M parameters takes seconds
            model = UNetModel(replace(cfg, activation_checkpointing=ac, attention_backend=attention))
        forward = lambda x, t, c: model(x, t, c)  # noqa: E731
        if compile_ and impl == "ours-whole":
            model.compile(dynamic=False, mode=mode)  # one graph for the whole UNet, still in place
        elif compile_:
            compile_blocks(model, mode=mode)  # what the trainer does with parallel.compile=true
    else:
        from diffusers import UNet2DConditionModel

        conf = {k: v for k, v in diffusers_unet.diffusers_config(cfg).items() if not k.startswith("_")}
        with torch.device(device):
            model = UNet2DConditionModel(**conf)
        if ac == "full":
            model.enable_gradient_checkpointing()
        elif ac != "none":
            raise ValueError(f"diffusers has no {ac!r} activation checkpointing")
        if attention not in SDPA_BACKENDS:
            raise ValueError(f"diffusers runs SDPA only, not attention {attention!r}")
        # diffusers calls F.scaled_dot_product_attention: a pinned kernel is pinned around its forward
        # (traced by torch.compile, as in our CrossAttention).
        pin = (lambda: sdpa_kernel([SDPA_KERNELS[attention[5:]]])) if attention != "sdpa" else contextlib.nullcontext

        def forward(x, t, c):
            with pin():
                return model(x, t, encoder_hidden_states=c, return_dict=False)[0]
        if compile_ and impl == "diffusers-whole":
            model.compile(dynamic=False, mode=mode)
        elif compile_:
            # Per block, in place, like ours: the whole-model graph took > 170 s to compile on an H200.
            compile_in_place([*model.down_blocks, model.mid_block, *model.up_blocks], mode=mode)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    return model, forward


def measure(res: Result, cfg: configs.UNetConfig, device: str, steps: int, warmup: int, flops_per_img: float,
            peak: float | None, profile_to: Path | None = None) -> Result:
    """Times `steps` steps after `warmup`; `profile_to`: then profiles 2 more and appends the breakdown
    by kernel kind (bench/profile_step.py) to that Markdown file."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[res.dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    model, forward = build(res.impl, cfg, device, res.channels_last, res.compile, res.ac, res.compile_mode,
                           res.attention)
    sync()
    res.build_s = time.perf_counter() - start
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                            **({"fused": True} if device == "cuda" else {}))
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(res.batch, cfg.in_channels, res.latent, res.latent, device=device, generator=gen)
    if res.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (res.batch,), device=device, generator=gen)
    ctx = torch.randn(res.batch, 77, cfg.context_dim, device=device, generator=gen)
    target = torch.randn_like(x)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            out = forward(x, t, ctx)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # the first of the warm-up steps, timed on its own: it compiles
    sync()
    res.first_step_s = time.perf_counter() - start
    res.record_rates(time_steps(step, steps, max(warmup - 1, 0), device), flops_per_img, peak, device)
    if profile_to is not None:
        from bench.profile_step import profile_step, to_markdown

        title = (f"{res.impl}, latent {res.latent}, batch {res.batch}, {res.dtype}, compile "
                 f"{res.compile_mode if res.compile else 'no'}, channels-last {res.channels_last}, AC {res.ac}, "
                 f"attention {res.attention}")
        with profile_to.open("a") as f:
            f.write(to_markdown(profile_step(step, device), title) + "\n")
    del model, opt
    return res


def table(results: list[Result]) -> str:
    head = ("| impl | arch | latent | batch | dtype | compile | ch-last | AC | attention | ms/step | img/s | TFLOP/s "
            "| MFU | peak GiB | time ours/diffusers / speedup | status |")
    lines = [head, "|" + "---|" * 16]
    base: dict[tuple, float] = {}  # diffusers' best (per-block or whole-graph compile) for each setting
    for r in results:
        if r.impl.startswith("diffusers") and r.status == "ok":
            key = (r.setting(), r.batch)
            base[key] = max(base.get(key, 0.0), r.img_per_s)
    for r in results:
        ratio = ""
        key = (r.setting(), r.batch)
        if r.impl.startswith("ours") and key in base:
            ratio = f"{base[key] / r.img_per_s:.3f} / {r.img_per_s / base[key]:.2f}x"
        compiled = r.compile_mode if r.compile else False
        lines.append(f"| {r.impl} | {r.arch} | {r.latent} | {r.batch} | {r.dtype} | {compiled} | {r.channels_last} "
                     f"| {r.ac} | {r.attention} | {r.ms_per_step:.1f} | {r.img_per_s:.2f} | {r.tflops:.1f} | {r.mfu:.3f} "
                     f"| {r.peak_mem_gib:.1f} | {ratio} | {r.status} |")
    return "\n".join(lines)


def largest_batches(results: list[Result], memory_gib: float = 79.0) -> str:
    """The largest micro-batch that fits `memory_gib`, per setting measured at two or more batch sizes:
    peak memory is linear in the batch (weights, gradients and AdamW state fixed; activations per image),
    so a least-squares line through the measured peaks gives both parts and where they reach the budget.
    Peak *allocated* memory: the allocator's fragmentation takes part of what is left."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.status == "ok" and r.peak_mem_gib == r.peak_mem_gib:  # measured (not NaN: a GPU row)
            groups.setdefault((r.impl, r.setting()), []).append(r)
    lines = []
    for rows in groups.values():
        batches = [r.batch for r in rows]
        if len(set(batches)) < 2:
            continue
        mean_b, mean_m = sum(batches) / len(rows), sum(r.peak_mem_gib for r in rows) / len(rows)
        per_image = (sum((r.batch - mean_b) * (r.peak_mem_gib - mean_m) for r in rows)
                     / sum((b - mean_b) ** 2 for b in batches))
        fixed = mean_m - per_image * mean_b
        largest = int((memory_gib - fixed) / per_image + 1e-6) if per_image > 0 else None  # 1e-6: float noise
        r = rows[0]
        lines.append(f"| {r.impl} | {r.arch} | {r.latent} | {r.dtype} | {r.compile_mode if r.compile else False} | "
                     f"{r.channels_last} | {r.ac} | {r.attention} | {','.join(map(str, sorted(batches)))} | "
                     f"{fixed:.1f} | {per_image:.3f} | "
                     f"{largest if largest is not None else '-'} |")
    if not lines:
        return ""
    head = (f"Largest micro-batch in {memory_gib:g} GiB (a line through the measured peaks):\n\n"
            "| impl | arch | latent | dtype | compile | ch-last | AC | attention | batches | fixed GiB | GiB per image "
            "| largest batch |\n" + "|" + "---|" * 12)
    return head + "\n" + "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=["tiny", "sd-v1"], default="sd-v1")
    p.add_argument("--latent", default="32,64", help="latent sizes (256 px = 32, 512 px = 64)")
    p.add_argument("--batch", default="8", help="micro-batch sizes")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--impl", default="ours,diffusers",
                   help="ours / diffusers (compiled per block), ours-whole / diffusers-whole (one graph)")
    p.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile modes, comma-separated: default, reduce-overhead (CUDA graphs), "
                        "max-autotune-no-cudagraphs, max-autotune")
    p.add_argument("--channels-last", choices=["no", "yes", "both"], default="no")
    p.add_argument("--ac", default="none", help="activation checkpointing policies: none, full, selective (ours)")
    p.add_argument("--attention", default="sdpa",
                   help="attention backends (models/attention.py), comma-separated: sdpa (torch picks the kernel), "
                        "sdpa-flash, sdpa-cudnn, sdpa-efficient (pinned, for diffusers too), math, xformers (ours)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 2 steps: device time by kernel kind into OUT/profile.md")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip what is left after this long")
    p.add_argument("--memory-gib", type=float, default=79.0,
                   help="the memory the largest-micro-batch table fits into (default: what an 80 GB card shows "
                        "torch, ~79 GiB)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    args = p.parse_args(argv)

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = (configs.tiny() if args.arch == "tiny" else configs.sd_v1()).unet
    peak = peak_tflops(args.device, args.dtype)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; peak {peak} TFLOP/s ({args.dtype}); torch {torch.__version__}", flush=True)
    flags = {"no": [False], "yes": [True], "both": [False, True]}
    results: list[Result] = []
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for latent in map(int, args.latent.split(",")):
        flops = unet_train_flops_per_image(cfg, latent)
        print(f"latent {latent}: {flops / 1e9:.1f} GFLOP per image (fwd+bwd)", flush=True)
        for compile_ in flags[args.compile]:
            for cl in flags[args.channels_last]:
                modes = args.compile_mode.split(",") if compile_ else ["default"]
                for mode, ac, attn, batch, impl in itertools.product(
                        modes, args.ac.split(","), args.attention.split(","), map(int, args.batch.split(",")),
                        args.impl.split(",")):
                    res = Result(impl, args.arch, latent, batch, args.dtype, compile_, cl, ac, mode, attn)
                    if impl.startswith("diffusers") and ac == "selective":
                        continue  # diffusers offers all-or-nothing checkpointing only
                    if time.perf_counter() - start > args.budget_s:
                        res.status = "skipped (time budget)"
                    else:
                        try:
                            measure(res, cfg, args.device, args.steps, args.warmup, flops, peak,
                                    args.out / "profile.md" if args.profile else None)
                        except torch.OutOfMemoryError:
                            res.status = "OOM"
                        except Exception as err:  # one failed configuration must not lose the others
                            res.status = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                        finally:
                            if args.device == "cuda":
                                torch.cuda.empty_cache()
                    results.append(res)
                    print(table([res]).splitlines()[-1], flush=True)
                    if res.status == "ok":
                        print(f"  (build {res.build_s:.1f} s, first step {res.first_step_s:.1f} s)", flush=True)
                    (args.out / "unet_step.json").write_text(json.dumps(
                        {"device": name, "peak_tflops": peak, "torch": torch.__version__,
                         "results": [asdict(r) for r in results]}, indent=1))
    md = f"device: {name}, torch {torch.__version__}, peak {peak} TFLOP/s\n\n" + table(results) + "\n"
    fits = largest_batches(results, args.memory_gib)
    md += f"\n{fits}\n" if fits else ""
    (args.out / "unet_step.md").write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
