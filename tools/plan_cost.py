"""What a stage plan costs: images seen, GPU-hours, wall-clock hours and the MFU a throughput implies;
and the inverse, the throughput a GPU-hour budget needs.

    python -m tools.plan_cost --throughput mosaicml-a100                     # the SD v1 chain, 32 x 8 A100
    python -m tools.plan_cost --img-per-s 256=137.5,512=36.3 --gpu A100 --nodes 32 --gpus-per-node 8
    python -m tools.plan_cost --budget-gpu-hours 10000                       # only what the budget needs
    python -m tools.plan_cost --plan warm:1000:256:256,main:5000:512:512 --img-per-s 256=100,512=30 --json
    python -m tools.plan_cost --throughput mosaicml-a100 --nodes 8 --node-gbps 400 --backend ddp --reduce-dtype bf16

The default plan is read from the Hydra stage configs (conf/stage/v1-1_256, v1-1_512, v1-2, v1-3),
composed as `python -m train` composes them, so it follows any change to steps, batch or resolution.
FLOPs per image are counted (train/flops.py) and MFU follows the trainer's throughput meter: UNet
forward + backward (W&B `throughput/mfu`); with --vae-online / --text-online the encoders' forward too
(`throughput/mfu_with_encoders`).
The collectives between nodes (tools/plan_network.py) bound each step from below: a stage whose per-GPU
batch computes faster than the network moves its gradients (and sharded parameters) runs at the
network's pace. The frozen VAE encoder is priced per dataset, precomputed and in the loop
(tools/plan_encoders.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from tools.plan_encoders import (VaeEncoderCost, text_encode_flops_per_caption, vae_encode_flops_per_image,
                                 vae_encoder_costs)
from tools.plan_network import BACKEND_VOLUME, bytes_per_step, collective_seconds
from train.config import REDUCE_DTYPES

# The SD v1 chain, in order (sd-v1-1 at 256 then 512, sd-v1-2, sd-v1-3).
SD_V1_STAGES = ("v1-1_256", "v1-1_512", "v1-2", "v1-3")
# VAE factor 8 x UNet downsampling 2**3: the resolutions the SD v1 UNet accepts (train.config.validate).
RESOLUTION_MULTIPLE = 64
DEFAULT_BUDGET_GPU_HOURS = 10_000.0  # the reproduction's goal for the whole v1-1 -> v1-3 plan


@dataclass(frozen=True)
class ThroughputPreset:
    gpu: str
    img_per_s: dict[int, float]  # resolution -> images/s per GPU
    source: str


# Reference throughputs. MosaicML's numbers are for SD2 on A100-80GB, whose UNet differs from v1's in its
# text context (1024 wide) and attention layout; the MFU shown is for the SD v1 UNet's FLOPs at that
# throughput, so read it as an approximation.
THROUGHPUT_PRESETS = {
    "mosaicml-a100": ThroughputPreset(
        gpu="A100", img_per_s={256: 137.5, 512: 36.3},
        source="MosaicML SD2 on A100-80GB (137.5 img/s/GPU at 256, 36.3 at 512)"),
}


class PlanError(ValueError):
    """Bad input; the message says what to change."""


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    global_batch: int
    resolution: int
    # Frozen encoders the stage's config runs in the training loop ("VAE encode", "text encode"): its
    # shards hold images / captions, not precomputed latents / text embeddings.
    online_encoders: tuple[str, ...] = ()
    # The LAION subset its shards hold (stage.data.subset; data/stages.py): stages on the same subset
    # and resolution share one precompute pass. None: the stage's own shards.
    dataset: str | None = None

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.global_batch <= 0:
            raise PlanError(f"stage {self.name}: steps ({self.steps}) and global batch ({self.global_batch}) "
                            "must be positive")
        if self.resolution <= 0 or self.resolution % RESOLUTION_MULTIPLE:
            raise PlanError(f"stage {self.name}: resolution {self.resolution} must be a positive multiple of "
                            f"{RESOLUTION_MULTIPLE} (VAE factor 8 x UNet downsampling 8)")

    @property
    def images(self) -> int:
        return self.steps * self.global_batch


@dataclass(frozen=True)
class Hardware:
    gpu: str
    dtype: str
    nodes: int
    gpus_per_node: int
    # Inter-node bandwidth per node (all NICs, Gbit/s; 0 = the network is not modelled: one node, or a
    # throughput measured on the whole cluster), the data-parallel backend and the gradients' dtype on
    # the wire (tools/plan_network.py).
    node_gbps: float = 0.0
    backend: str = "fsdp"
    reduce_dtype: str = "fp32"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def network_s(self) -> float:
        """The collectives' floor per optimiser step (tools/plan_network.py)."""
        return collective_seconds(self.nodes, self.node_gbps, self.backend, self.reduce_dtype, self.dtype)

    @property
    def peak_flops(self) -> float:
        """Dense peak in FLOP/s per GPU (train/flops.py's table)."""
        return peak_tflops_for(self.gpu, self.dtype) * 1e12


@dataclass(frozen=True)
class FlopsModel:
    """Which networks run for every training image. Frozen encoders count only when they run in the
    loop: with precomputed latents / text embeddings their cost was paid once, before training."""

    vae_encode: bool = False
    text_encode: bool = False

    def per_image(self, resolution: int) -> float:
        from models.configs import UNetConfig
        from train.flops import unet_train_flops_per_image

        flops = unet_train_flops_per_image(UNetConfig(), resolution // 8)
        if self.vae_encode:
            flops += vae_encode_flops_per_image(resolution)
        if self.text_encode:
            flops += text_encode_flops_per_caption()
        return flops


@dataclass(frozen=True)
class StageCost:
    name: str
    resolution: int
    steps: int
    global_batch: int
    images: int
    flops_per_image: float
    flops: float
    img_per_s_per_gpu: float | None  # as given (one GPU's step); None: no throughput given (budget-only mode)
    mfu: float | None  # at the effective throughput
    gpu_hours: float | None
    wall_hours: float | None
    online_encoders: tuple[str, ...] = ()
    compute_ms_per_step: float | None = None  # this GPU's share of the global batch at the given img/s
    network_ms_per_step: float = 0.0  # the collectives between nodes (gradients, sharded parameters), at best
    img_per_s_effective: float | None = None  # per GPU, each step max(compute, network) long
    network_floor_gpu_hours: float = 0.0  # the steps at the network's pace alone: no MFU goes below it


@dataclass(frozen=True)
class ResolutionTotal:
    resolution: int
    images: int
    gpu_hours: float | None


@dataclass(frozen=True)
class BudgetCheck:
    budget_gpu_hours: float
    # The same MFU at every resolution spends exactly the budget, each step max(compute, network) long as
    # in the plan; None where the network alone takes the budget (no MFU reaches it).
    required_mfu: float | None
    required_img_per_s: dict[int, float]  # resolution -> img/s per GPU at that MFU ({} where None)
    wall_hours_at_budget: float
    plan_gpu_hours: float | None
    meets_budget: bool | None
    plan_to_budget: float | None  # plan hours / budget
    # The factor on every stage's img/s that makes the plan spend exactly the budget (the network's
    # share does not speed up); None without a throughput, or where the network alone takes the budget.
    speedup_to_budget: float | None = None


@dataclass(frozen=True)
class CostReport:
    hardware: Hardware
    peak_tflops: float
    flops_model: FlopsModel
    throughput_source: str | None
    stages: list[StageCost]
    by_resolution: list[ResolutionTotal]
    total_images: int
    total_flops: float
    total_gpu_hours: float | None
    total_wall_hours: float | None
    budget: BudgetCheck
    network_floor_gpu_hours: float = 0.0
    vae_encoder: list[VaeEncoderCost] = field(default_factory=list)
    vae_encoder_gpu_hours: float | None = None  # as the stages run it (precomputed or in the loop)


# ---- FLOPs and peaks ------------------------------------------------------------------------------

def peak_tflops_for(gpu: str, dtype: str) -> float:
    from train.flops import PEAK_TFLOPS

    names = {name.upper(): name for name in PEAK_TFLOPS}
    if gpu.upper() not in names:
        raise PlanError(f"unknown GPU {gpu!r}: choose one of {', '.join(sorted(PEAK_TFLOPS))} "
                        "(peaks in train/flops.py: PEAK_TFLOPS)")
    peaks = PEAK_TFLOPS[names[gpu.upper()]]
    if dtype not in peaks:
        raise PlanError(f"dtype {dtype!r}: choose one of {', '.join(peaks)}")
    if peaks[dtype] is None:
        raise PlanError(f"{gpu} has no {dtype} tensor cores; choose another --dtype")
    return float(peaks[dtype])


# ---- the plan -------------------------------------------------------------------------------------

def stages_from_configs(names: Sequence[str]) -> list[Stage]:
    """Steps, global batch and resolution of each stage, composed exactly as `python -m train` does."""
    from launch.config import compose_config

    stages = []
    for name in names:
        try:
            cfg = compose_config([f"stage={name}"])
        except Exception as err:
            # Hydra's message lists the stage configs that exist; its search path is noise here.
            message = str(err).split("Config search path")[0].strip()
            raise PlanError(f"stage config {name!r}: {message}") from err
        online = (("VAE encode",) if not cfg.stage.data.latents else ()) + \
                 (("text encode",) if not cfg.stage.data.context else ())
        stages.append(Stage(name=str(cfg.stage.name), steps=int(cfg.stage.steps),
                            global_batch=int(cfg.stage.global_batch), resolution=int(cfg.stage.data.resolution),
                            online_encoders=online, dataset=cfg.stage.data.subset))
    return stages


def parse_plan(text: str) -> list[Stage]:
    """`name:steps:global_batch:resolution,...` -> stages (a plan that has no config files)."""
    stages = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 4:
            raise PlanError(f"--plan item {item!r}: write name:steps:global_batch:resolution")
        name, *numbers = parts
        try:
            steps, batch, res = (int(n.replace("_", "")) for n in numbers)
        except ValueError as err:
            raise PlanError(f"--plan item {item!r}: steps, global batch and resolution must be integers") from err
        stages.append(Stage(name=name, steps=steps, global_batch=batch, resolution=res))
    if not stages:
        raise PlanError("--plan is empty")
    return stages


def parse_img_per_s(text: str, flag: str = "--img-per-s") -> dict[int, float]:
    """`256=137.5,512=36.3` -> {256: 137.5, 512: 36.3}."""
    out: dict[int, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        res, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(res)] = float(value)
        except ValueError as err:
            raise PlanError(f"{flag} item {item!r}: write RESOLUTION=IMAGES_PER_S, e.g. 256=137.5") from err
        if not out[int(res)] > 0:
            raise PlanError(f"{flag} item {item!r}: the throughput must be positive")
    return out


# ---- the arithmetic -------------------------------------------------------------------------------

def stage_cost(stage: Stage, flops_per_image: float, img_per_s: float | None, hw: Hardware) -> StageCost:
    images = stage.images
    network_s = hw.network_s
    common = dict(name=stage.name, resolution=stage.resolution, steps=stage.steps, global_batch=stage.global_batch,
                  images=images, flops_per_image=flops_per_image, flops=images * flops_per_image,
                  online_encoders=stage.online_encoders, network_ms_per_step=1e3 * network_s,
                  network_floor_gpu_hours=stage.steps * network_s * hw.world_size / 3600.0)
    if img_per_s is None:
        return StageCost(**common, img_per_s_per_gpu=None, mfu=None, gpu_hours=None, wall_hours=None)
    per_gpu = stage.global_batch / hw.world_size
    compute_s = per_gpu / img_per_s
    effective = per_gpu / max(compute_s, network_s)
    gpu_hours = images / effective / 3600.0
    return StageCost(**common, img_per_s_per_gpu=img_per_s, mfu=effective * flops_per_image / hw.peak_flops,
                     gpu_hours=gpu_hours, wall_hours=gpu_hours / hw.world_size, compute_ms_per_step=1e3 * compute_s,
                     img_per_s_effective=effective)


def _gpu_hours_at(costs: Sequence[StageCost], hw: Hardware, compute_s: Callable[[StageCost], float]) -> float:
    """The plan's GPU-hours with each stage's compute per step given, the steps max(compute, network)
    long as in stage_cost."""
    return sum(c.steps * max(compute_s(c), hw.network_s) for c in costs) * hw.world_size / 3600.0


def _solve_decreasing(f: Callable[[float], float], target: float) -> float:
    """x > 0 with f(x) = target, for f decreasing towards a floor below target (bisection in log x)."""
    lo, hi = 1e-12, 1.0
    while f(hi) > target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return hi


def budget_check(costs: Sequence[StageCost], budget_gpu_hours: float, hw: Hardware) -> BudgetCheck:
    """The throughput that spends exactly the budget. Holding MFU equal across resolutions is the one
    assumption that turns one number (GPU-hours) into a throughput per resolution. Without a network
    floor the required MFU is total FLOPs / (budget seconds x peak); with one, the steps that wait for
    the network cost the same at any MFU, so the MFU is solved for with each step max(compute,
    network) long, the rule the plan's own hours follow (an inverse that ignored it was not one)."""
    if not budget_gpu_hours > 0:
        raise PlanError(f"--budget-gpu-hours {budget_gpu_hours}: must be positive")
    floor = _gpu_hours_at(costs, hw, lambda c: 0.0)

    def per_gpu(c: StageCost) -> float:
        return c.global_batch / hw.world_size

    required_mfu, required, speedup = None, {}, None
    if floor < budget_gpu_hours:
        required_mfu = _solve_decreasing(
            lambda m: _gpu_hours_at(costs, hw, lambda c: per_gpu(c) * c.flops_per_image / (m * hw.peak_flops)),
            budget_gpu_hours)
        required = {c.resolution: required_mfu * hw.peak_flops / c.flops_per_image for c in costs}
    plan_hours = _total(c.gpu_hours for c in costs)
    if plan_hours is not None and floor < budget_gpu_hours:
        speedup = _solve_decreasing(
            lambda k: _gpu_hours_at(costs, hw, lambda c: per_gpu(c) / (c.img_per_s_per_gpu * k)), budget_gpu_hours)
    return BudgetCheck(
        budget_gpu_hours=budget_gpu_hours, required_mfu=required_mfu, required_img_per_s=required,
        wall_hours_at_budget=budget_gpu_hours / hw.world_size, plan_gpu_hours=plan_hours,
        meets_budget=None if plan_hours is None else plan_hours <= budget_gpu_hours,
        plan_to_budget=None if plan_hours is None else plan_hours / budget_gpu_hours,
        speedup_to_budget=speedup)


def plan_cost(stages: Sequence[Stage], hw: Hardware, img_per_s: dict[int, float] | None,
              budget_gpu_hours: float = DEFAULT_BUDGET_GPU_HOURS, flops_model: FlopsModel = FlopsModel(),
              throughput_source: str | None = None,
              vae_img_per_s: dict[int, float] | None = None) -> CostReport:
    """Cost of every stage and the total; `img_per_s` None = budget-only (what throughput is needed).
    `vae_img_per_s`: the VAE encoder's measured forward img/s per GPU by resolution (else assumed at the
    UNet step's MFU)."""
    if not stages:
        raise PlanError("the plan has no stages")
    if hw.nodes < 1 or hw.gpus_per_node < 1:
        raise PlanError(f"--nodes {hw.nodes}, --gpus-per-node {hw.gpus_per_node}: both must be >= 1")
    if hw.node_gbps < 0 or hw.reduce_dtype not in REDUCE_DTYPES or hw.backend not in BACKEND_VOLUME:
        raise PlanError(f"--node-gbps {hw.node_gbps} must be >= 0 (0: the network is not modelled), --backend "
                        f"{hw.backend!r} one of {', '.join(BACKEND_VOLUME)} and --reduce-dtype {hw.reduce_dtype!r} "
                        f"one of {', '.join(REDUCE_DTYPES)}")
    peak = peak_tflops_for(hw.gpu, hw.dtype)  # refuses an unknown GPU before any FLOP counting
    if img_per_s is not None:
        missing = [s for s in stages if s.resolution not in img_per_s]
        if missing:
            res = sorted({s.resolution for s in missing})
            raise PlanError(f"no throughput for resolution {', '.join(map(str, res))} (stages "
                            f"{', '.join(s.name for s in missing)}); add it, e.g. --img-per-s "
                            + ",".join(f"{r}=N" for r in res))
    costs = [stage_cost(s, flops_model.per_image(s.resolution),
                        None if img_per_s is None else img_per_s[s.resolution], hw) for s in stages]
    total_hours = _total(c.gpu_hours for c in costs)
    vae_encoder = vae_encoder_costs(stages, costs, flops_model, hw, vae_img_per_s)
    return CostReport(
        hardware=hw, peak_tflops=peak, flops_model=flops_model, throughput_source=throughput_source, stages=costs,
        by_resolution=by_resolution(costs), total_images=sum(c.images for c in costs),
        total_flops=sum(c.flops for c in costs),
        total_gpu_hours=total_hours, total_wall_hours=None if total_hours is None else total_hours / hw.world_size,
        budget=budget_check(costs, budget_gpu_hours, hw),
        network_floor_gpu_hours=sum(c.network_floor_gpu_hours for c in costs),
        vae_encoder=vae_encoder,
        vae_encoder_gpu_hours=_total(v.gpu_hours for v in vae_encoder) if vae_encoder else None)


def by_resolution(costs: Sequence[StageCost]) -> list[ResolutionTotal]:
    # Stages at one resolution share a throughput: these are the sums the budget is argued in.
    return [ResolutionTotal(resolution=res, images=sum(c.images for c in costs if c.resolution == res),
                            gpu_hours=_total(c.gpu_hours for c in costs if c.resolution == res))
            for res in sorted({c.resolution for c in costs})]


def _total(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


# ---- output ---------------------------------------------------------------------------------------

def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def _hours(h: float | None) -> str:
    # Whole hours where that is precise enough, three significant digits for short plans.
    return "-" if h is None else f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(r: CostReport) -> str:
    hw = r.hardware
    encoders = [n for n, on in (("VAE encode", r.flops_model.vae_encode), ("text encode", r.flops_model.text_encode))
                if on]
    lines = [
        f"hardware: {hw.nodes} x {hw.gpus_per_node} {hw.gpu} = {hw.world_size} GPUs, "
        f"peak {r.peak_tflops:g} TFLOP/s ({hw.dtype}, dense)",
        "FLOPs per image: UNet forward + backward" + (" + " + " + ".join(encoders) if encoders else ""),
        f"throughput: {r.throughput_source or 'none given (budget only)'}",
        _per_gpu_batch_line(r.stages, hw),
        *_uncounted_encoder_lines(r),
        "",
        *_network_lines(hw),
        "",
        f"{'stage':<10} {'res':>4} {'steps':>8} {'batch':>6} {'images':>9} {'GFLOP/img':>9} "
        f"{'img/s/GPU':>9} {'step ms':>13} {'MFU':>6} {'GPU-hours':>10} {'wall h':>8}",
    ]
    for c in r.stages:
        mfu = "-" if c.mfu is None else f"{100 * c.mfu:.1f}%"
        lines.append(f"{c.name:<10} {c.resolution:>4} {c.steps:>8} {c.global_batch:>6} {_count(c.images):>9} "
                     f"{c.flops_per_image / 1e9:>9,.1f} {_opt(c.img_per_s_per_gpu, '.1f'):>9} {_step_ms(c):>13} "
                     f"{mfu:>6} {_hours(c.gpu_hours):>10} {_hours(c.wall_hours):>8}")
    lines.append(f"{'total':<10} {'':>4} {sum(c.steps for c in r.stages):>8} {'':>6} {_count(r.total_images):>9} "
                 f"{'':>9} {'':>9} {'':>13} {'':>6} {_hours(r.total_gpu_hours):>10} {_hours(r.total_wall_hours):>8}")
    if len(r.by_resolution) > 1:
        lines += [f"{'  at ' + str(t.resolution):<10} {'':>4} {'':>8} {'':>6} {_count(t.images):>9} {'':>9} "
                  f"{'':>9} {'':>13} {'':>6} {_hours(t.gpu_hours):>10}" for t in r.by_resolution]
    lines += _vae_encoder_lines(r)
    lines += ["", *_format_budget(r.budget, hw, r.network_floor_gpu_hours)]
    return "\n".join(lines)


def _vae_encoder_lines(r: CostReport) -> list[str]:
    """The VAE encoder's cost beside the training it feeds, both ways, per dataset: the budget is argued
    on the UNet step (the issue's numbers), but no plan is free of the encoder."""
    if not r.vae_encoder:
        return []
    lines = ["", "VAE encoder (not in the img/s above): precomputed once per distinct image, or in the loop once "
                 "per sample",
             f"{'dataset':<26} {'res':>4} {'for':<12} {'samples':>9} {'images':>9} {'GFLOP/img':>9} "
             f"{'precompute h':>12} {'in-loop h':>10}  stages run it"]
    for v in r.vae_encoder:
        lines.append(f"{v.dataset:<26} {v.resolution:>4} {','.join(v.stages):<12} {_count(v.samples):>9} "
                     f"{_count(v.images):>9} {v.flops_per_image / 1e9:>9,.1f} {_hours(v.precompute_gpu_hours):>12} "
                     f"{_hours(v.loop_gpu_hours):>10}  {'precomputed' if v.precomputed else 'in the loop'}")
    measured = sorted({v.resolution for v in r.vae_encoder if v.throughput == "measured"})
    speed = (f"the encoder's img/s measured at {', '.join(map(str, measured))} px (--vae-img-per-s)"
             + (", assumed at the UNet step's MFU elsewhere" if len(measured) < len(r.vae_encoder) else "")
             if measured else "the encoder assumed at the UNet step's MFU (--vae-img-per-s to give it)")
    lines.append("images: the samples drawn, or a subset's row count where smaller (data/stages.py); " + speed
                 + "; in the loop it costs nothing while a step waits for the network")
    if r.total_gpu_hours is not None and r.vae_encoder_gpu_hours is not None:
        all_pre = _total(v.precompute_gpu_hours for v in r.vae_encoder)
        all_loop = _total(v.loop_gpu_hours for v in r.vae_encoder)
        as_run = r.total_gpu_hours + r.vae_encoder_gpu_hours
        lines.append(f"training + VAE encoder as the stages run it: {_hours(as_run)} GPU-hours (all precomputed: "
                     f"{_hours(r.total_gpu_hours + all_pre)}, all in the loop: {_hours(r.total_gpu_hours + all_loop)})")
    return lines


def _uncounted_encoder_lines(r: CostReport) -> list[str]:
    """The text encoder, where the stage configs run it in the loop and the FLOP count leaves it out: a
    UNet-only img/s overstates those stages by its share (13 GFLOP a caption: 2.4% of the UNet step at
    256 px, 0.5% at 512). The VAE encoder has its own table (_vae_encoder_lines)."""
    names = [c.name for c in r.stages if "text encode" in c.online_encoders]
    if r.flops_model.text_encode or not names:
        return []
    return [f"note: {', '.join(names)} run the text encoder in the loop (stage.data.context false, "
            f"{text_encode_flops_per_caption() / 1e9:.0f} GFLOP a caption), not counted here: with an img/s measured "
            "with it, add --text-online"]


def _network_lines(hw: Hardware) -> list[str]:
    if hw.network_s == 0:
        return ["network: not modelled (one node, or --node-gbps 0)"]
    gigabytes = bytes_per_step(hw.backend, hw.reduce_dtype, hw.dtype) / 1e9
    return [f"network: {hw.backend} moves {gigabytes:.2f} GB per step (gradients in {hw.reduce_dtype}) across "
            f"{hw.nodes} nodes at {hw.node_gbps:g} Gbit/s each: >= {1e3 * hw.network_s:.0f} ms per step; "
            "step ms = compute / network, the step taken as the longer (tools/plan_network.py)"]


def _step_ms(c: StageCost) -> str:
    """"compute / network" ms per step; "-" for what is not known (no throughput) or not modelled."""
    compute = _opt(c.compute_ms_per_step, ".0f")
    network = f"{c.network_ms_per_step:.0f}" if c.network_ms_per_step else "-"
    return "-" if compute == network == "-" else f"{compute} / {network}"


def _per_gpu_batch_line(stages: Sequence[StageCost], hw: Hardware) -> str:
    """A throughput only holds at the micro-batch it was measured at, and the cluster size fixes that
    batch: SD's 2048 over 256 GPUs is 8 images per GPU per step, where a step runs far below the MFU
    of the 32-128-image batches benchmarks like to quote."""
    per_gpu = sorted({c.global_batch / hw.world_size for c in stages})
    shown = ", ".join(f"{b:g}" for b in per_gpu)
    uneven = any(b != int(b) for b in per_gpu)
    return (f"images per GPU per step: {shown} (global batch / {hw.world_size} GPUs"
            + ("; not a whole number: the trainer refuses such a cluster" if uneven else "")
            + "): give img/s measured at that micro-batch (with gradient accumulation above what fits)")


def _format_budget(b: BudgetCheck, hw: Hardware, network_floor: float = 0.0) -> list[str]:
    head = f"budget {_hours(b.budget_gpu_hours)} {hw.gpu}-hours"
    if b.meets_budget is None:
        verdict = ""
    elif b.meets_budget:
        verdict = f": MET (plan {_hours(b.plan_gpu_hours)} GPU-hours, {100 * b.plan_to_budget:.0f}% of the budget)"
    else:
        need = ("no speed-up of the compute reaches it" if b.speedup_to_budget is None
                else f"needs a {b.speedup_to_budget:.2f}x speed-up")
        verdict = f": NOT MET (plan {_hours(b.plan_gpu_hours)} GPU-hours, {need})"
    lines = [head + verdict]
    if b.required_mfu is not None:
        needed = ", ".join(f"{res}: {v:.1f}" for res, v in sorted(b.required_img_per_s.items()))
        lines += ["  to spend exactly the budget, at the same MFU at every resolution"
                  + (" (the steps that wait for the network included):" if network_floor else ":"),
                  f"  MFU {100 * b.required_mfu:.1f}%; img/s per GPU {needed}; wall clock "
                  f"{_hours(b.wall_hours_at_budget)} h on {hw.world_size} GPUs"]
    if network_floor:
        lines.append(f"  the collectives alone take {_hours(network_floor)} GPU-hours on this cluster"
                     + (": OUT OF REACH at any MFU here; use fewer GPUs (more images per GPU per step), "
                        "--reduce-dtype bf16, a backend that moves less or a faster network"
                        if network_floor >= b.budget_gpu_hours else ""))
    return lines


def report_json(r: CostReport) -> dict:
    out = asdict(r)
    out["hardware"]["world_size"] = r.hardware.world_size
    # JSON keys are strings; say what they are rather than leave "256" ambiguous.
    out["budget"]["required_img_per_s"] = {str(k): v for k, v in r.budget.required_img_per_s.items()}
    return out


# ---- command line ---------------------------------------------------------------------------------

def _throughput(args: argparse.Namespace) -> tuple[dict[int, float] | None, str | None, str | None]:
    """(img/s per resolution, where it comes from, the GPU a preset was measured on)."""
    if args.throughput and args.img_per_s:
        raise PlanError("give either --throughput PRESET or --img-per-s, not both")
    if args.throughput:
        if args.throughput not in THROUGHPUT_PRESETS:
            raise PlanError(f"unknown --throughput {args.throughput!r}: choose one of "
                            f"{', '.join(sorted(THROUGHPUT_PRESETS))}")
        preset = THROUGHPUT_PRESETS[args.throughput]
        return dict(preset.img_per_s), f"{args.throughput}: {preset.source}", preset.gpu
    if args.img_per_s:
        values = parse_img_per_s(args.img_per_s)
        return values, "--img-per-s " + ", ".join(f"{k}: {v:g}" for k, v in sorted(values.items())), None
    return None, None, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.plan_cost", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    plan = p.add_mutually_exclusive_group()
    plan.add_argument("--stages", default=",".join(SD_V1_STAGES),
                      help="stage configs from conf/stage, comma-separated (default: the SD v1 chain)")
    plan.add_argument("--plan", help="a plan without configs: name:steps:global_batch:resolution,...")
    p.add_argument("--throughput", help=f"a named reference: {', '.join(sorted(THROUGHPUT_PRESETS))}")
    p.add_argument("--img-per-s", help="images/s per GPU by resolution, e.g. 256=137.5,512=36.3")
    p.add_argument("--gpu", help="peak table entry (train/flops.py); default: the preset's GPU, else A100")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--nodes", type=int, default=32)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--node-gbps", type=float, default=400.0,
                   help="inter-node bandwidth per node, all NICs, Gbit/s (default: the reference cluster's p4de "
                        "EFA, 4 x 100); 0 = do not model the collectives")
    p.add_argument("--backend", default="fsdp", choices=tuple(BACKEND_VOLUME),
                   help="what crosses the network each step: ddp (all-reduce), fsdp (the trainer's default; "
                        "fsdp-reshard with parallel.reshard_after_forward=true), zero2 / zero3 (DeepSpeed)")
    p.add_argument("--reduce-dtype", default="fp32", choices=REDUCE_DTYPES,
                   help="gradients on the wire (the trainer's parallel.reduce_dtype)")
    p.add_argument("--budget-gpu-hours", type=float, default=DEFAULT_BUDGET_GPU_HOURS)
    p.add_argument("--vae-online", action="store_true",
                   help="latents are not precomputed: count the VAE encoder's forward for every image")
    p.add_argument("--text-online", action="store_true",
                   help="text embeddings are not precomputed: count the CLIP text encoder's forward")
    p.add_argument("--vae-img-per-s", help="the VAE encoder's forward img/s per GPU by resolution, as "
                   "bench/vae_encode.py measures it at precompute's batch and dtype (e.g. 512=60); default: "
                   "assumed at the UNet step's MFU")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        img_per_s, source, preset_gpu = _throughput(args)
        if args.gpu and preset_gpu and args.gpu.upper() != preset_gpu.upper():
            raise PlanError(f"--throughput {args.throughput} was measured on {preset_gpu}, not {args.gpu}; "
                            "use --img-per-s for another GPU")
        hw = Hardware(gpu=args.gpu or preset_gpu or "A100", dtype=args.dtype, nodes=args.nodes,
                      gpus_per_node=args.gpus_per_node, node_gbps=args.node_gbps, backend=args.backend,
                      reduce_dtype=args.reduce_dtype)
        peak_tflops_for(hw.gpu, hw.dtype)  # an unknown GPU is refused before composing configs
        stages = parse_plan(args.plan) if args.plan else stages_from_configs(
            [s.strip() for s in args.stages.split(",") if s.strip()])
        report = plan_cost(stages, hw, img_per_s, args.budget_gpu_hours,
                           FlopsModel(vae_encode=args.vae_online, text_encode=args.text_online), source,
                           vae_img_per_s=parse_img_per_s(args.vae_img_per_s, "--vae-img-per-s") if args.vae_img_per_s else None)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report_json(report), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
