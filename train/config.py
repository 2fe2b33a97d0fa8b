"""The training config schema: typed dataclasses registered as Hydra structured configs.

YAML under `conf/` holds values only; every cross-field rule is checked in `validate()` at start-up
with a message that says what to change.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from models import configs as model_configs


@dataclass
class ModelConfig:
    # "sd-v1" (860M UNet), "tiny" (same architecture, toy width: tests), "mini" (tiny with a pixel-space
    # first stage: the embedded miniature reproduction).
    arch: str = "sd-v1"
    attention_backend: str = "sdpa"
    # none | full | selective (see models/configs.py UNetConfig)
    activation_checkpointing: str = "none"
    # Frozen parts come from here (an original .ckpt / safetensors, or a trainer export folder); None = random
    # init (tests, toy runs).
    pretrained_first_stage: Optional[str] = None
    # Or each from where SD v1 took it (models/pretrained_parts.py), instead of pretrained_first_stage: the
    # LDM autoencoder's kl-f8 model.ckpt (or a diffusers vae/ folder), and a transformers CLIP folder
    # (openai/clip-vit-large-patch14, or a CLIPTextModel's).
    pretrained_vae: Optional[str] = None
    pretrained_text_encoder: Optional[str] = None

    def sd_config(self) -> model_configs.SDConfig:
        archs = {"sd-v1": model_configs.sd_v1, "tiny": model_configs.tiny, "mini": model_configs.mini}
        if self.arch not in archs:
            raise ConfigError(f"model.arch={self.arch!r}: choose one of {sorted(archs)}")
        base = archs[self.arch]()
        from dataclasses import replace

        try:  # the UNet config checks its own fields; say which of ours set them
            unet = replace(base.unet, attention_backend=self.attention_backend,
                           activation_checkpointing=self.activation_checkpointing)
        except ValueError as err:
            raise ConfigError(f"model.* sets {err}") from err
        return replace(base, unet=unet)


@dataclass
class DataConfig:
    # WebDataset shard URLs: a brace pattern ("/data/laion/{00000..09999}.tar"), `pipe:` URLs work too.
    shards: str = "???"
    resolution: int = 256
    num_workers: int = 4
    caption_dropout: float = 0.0
    crop: str = "center"
    # Per-sample filter preset applied in the loader (for shards made without it); None = keep all.
    subset: Optional[str] = None
    # Shards hold precomputed VAE latents (and maybe text embeddings) instead of images.
    latents: bool = False
    context: bool = False
    # The image shards (a brace pattern) the latent shards are made from: `python -m launch slurm|chain`
    # then submits `python -m data precompute` for the missing ones before the stage (launch/precompute.py).
    # The trainer does not read it.
    precompute_from: Optional[str] = None
    # Held-out shards (a brace pattern, of the same kind as `shards`: latents with latents) for the validation
    # loss every tracking.val_every steps (train/validation.py); read whole, in order, once at start-up.
    val_shards: Optional[str] = None
    shuffle_buffer: int = 1000
    shards_per_group: int = 4
    # Seconds a rank waits for its loader's next batch before the run fails (0: forever): a `pipe:` command
    # that hangs then stops the run, which resumes exactly from its checkpoint (num_workers > 0 only).
    timeout_s: float = 0.0
    # Stop when a loader stream meets this many unreadable shards in a row (0: skip them all): isolated bad
    # shards are skipped and counted, so many in a row is the shards' access failing (data/loader.py).
    max_unreadable_in_a_row: int = 64


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    # LR multiplier rises linearly from warmup_start to 1 over warmup_steps optimiser steps, then stays 1.
    warmup_steps: int = 10_000
    warmup_start: float = 1e-6
    # CompVis' --scale_lr multiplied the LR by the batch size; SD v1 did not use it. Kept only to refuse it.
    scale_lr: bool = False
    grad_clip: Optional[float] = None


@dataclass
class EMAConfig:
    enabled: bool = True
    max_decay: float = 0.9999
    # "step": once per optimiser step; "micro_batch": once per micro-batch, as the original's Lightning
    # on_train_batch_end hook did (twice per step with accumulation 2). The original's cadence needs its
    # accumulation too: on 32x8 with the shipped micro_batch 8 there is none (add stage.micro_batch=4).
    update_every: str = "step"


# parallel.reduce_dtype: the dtypes gradients may cross the network in (tools/plan_network.py models them).
REDUCE_DTYPES = ("fp32", "bf16")


@dataclass
class ParallelConfig:
    # mixed precision: "bf16" (no loss scaling), "fp16" (dynamic loss scaling), "fp32".
    precision: str = "bf16"
    # torch.compile each UNet block in place. The backend is "inductor" for speed; "aot_eager" traces
    # forward and backward the same way without generating kernels (the CPU tests use it: inductor's
    # C++ build of every block takes minutes there).
    compile: bool = False
    compile_backend: str = "inductor"
    # NHWC activations and weights for the UNet's convolutions (models/unet.py:use_channels_last): with
    # compile, +44% on an H200 together (bench/RESULTS.md); on CPU about even.
    channels_last: bool = True
    tf32: bool = True
    # cuDNN times its convolution algorithms on the first call of each shape and keeps the fastest: the
    # step's shapes are fixed (one resolution and micro-batch per stage), so the search is paid once.
    cudnn_benchmark: bool = True
    # The gradients' dtype in the all-reduce / reduce-scatter between ranks: "fp32" (the default, as
    # the original's DDP) or "bf16" (half the bytes on the network: on 256 GPUs at 8 images each the
    # reduction outlasts the 256 px step, tools/plan_network.py; bf16 rounds each rank's share first).
    reduce_dtype: str = "fp32"
    # FSDP2: free each block's gathered parameters after its forward and gather them again for the
    # backward (true), or keep them (false: 1.7 GB of bf16 for the whole 860M UNet, and a third less on the
    # network per step than true: reduce-scatter + one all-gather, tools/plan_network.py).
    reshard_after_forward: bool = False
    # DeepSpeed ZeRO stage (1, 2 or 3).
    zero_stage: int = 2


@dataclass
class InitConfig:
    """What a stage takes from the previous one (a different operation from resuming the same run)."""

    # A trainer export folder or an original .ckpt; None = random init (v1-1 at 256).
    from_checkpoint: Optional[str] = None
    weights: bool = True
    ema: bool = True
    optimizer: bool = False
    step: bool = False
    # Restart the LR warmup from zero (True) or continue the schedule from the carried step (False: needs step).
    restart_warmup: bool = True


@dataclass
class StageConfig:
    name: str = "???"
    # Optimiser steps in this stage.
    steps: int = "???"  # type: ignore[assignment]
    global_batch: int = 2048
    micro_batch: int = 4
    data: DataConfig = field(default_factory=DataConfig)
    init: InitConfig = field(default_factory=InitConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 2
    # Checkpoints at multiples of this step stay whatever keep_last says, to evaluate the stage over its
    # training later (CompVis kept one every 10k steps the same way, for metrics over train steps); 0: none.
    keep_every: int = 0
    # Consolidated export (original .ckpt + safetensors) at the end of the stage.
    export_on_finish: bool = True
    # Instead of training: "latest", or a step whose checkpoint is kept: write that checkpoint as
    # <run.dir>/exports/step-N/model.ckpt (raw + EMA, as the stage's own export) and exit; any number of
    # processes, e.g. one on a CPU (train/export.py).
    export: Optional[str] = None
    # After this many non-finite losses in a row, save and abort.
    max_nonfinite_in_a_row: int = 5


@dataclass
class TrackingConfig:
    # W&B mode: "online", "offline" (no account needed) or "disabled".
    wandb_mode: str = "offline"
    project: str = "sd-repro"
    entity: Optional[str] = None
    log_every: int = 10
    sample_every: int = 0
    # Steps between validation losses (val/loss, and val/loss_ema with the EMA) on stage.data.val_shards; 0: none.
    val_every: int = 0
    # The weights the grids are drawn with: "ema" (what the stage exports and CompVis' image logger drew
    # with) or "raw" (the optimiser's current weights).
    sample_weights: str = "ema"
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])
    progress_bar: bool = True


@dataclass
class ClusterConfig:
    """Where the job runs; the launcher reads it, the trainer only checks its world size against it."""

    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 1
    # "cpu" runs every process on the CPU with gloo (tests, the embedded default).
    device: str = "cuda"
    # The card, for the MFU's peak (train/flops.py PEAK_TFLOPS, e.g. "A100-SXM4-80GB"); None = the driver's name.
    gpu_name: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time_limit: str = "24:00:00"
    cpus_per_task: int = 8
    mem: Optional[str] = None
    signal_grace_s: int = 300
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # The rest is read by the launcher only (`python -m launch`, see launch/README.md).
    # Interpreter on the nodes, after `setup` ran. None: `python` from the job's PATH when `setup` (in a Slurm
    # job) or `exec_prefix` makes the environment, else the one running the launcher (same venv, shared FS).
    python: Optional[str] = None
    # Rendezvous port on the first node; None = 20000 + job id % 20000 under Slurm, a free port locally.
    master_port: Optional[int] = None
    # torchrun restarts the whole group this many times after a worker crash (it resumes from `latest`).
    max_restarts: int = 3
    # A job requeues itself after a pre-emption warning at most this many times (SLURM_RESTART_COUNT).
    max_requeues: int = 20
    # Slurm's stdout/stderr folder; None = <run.dir>/slurm.
    log_dir: Optional[str] = None
    # Extra `#SBATCH` options (--exclusive, --constraint=..., --qos=...) and srun options (e.g. pyxis'
    # --container-image=...); words put before the interpreter on each node (e.g. apptainer exec --nv IMG).
    sbatch_args: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)
    exec_prefix: list[str] = field(default_factory=list)


@dataclass
class FaultConfig:
    """Fault injection for the tests of the failure paths (never set in a real run)."""

    # Every rank SIGKILLs itself right after the checkpoint of this step is complete (a node crash).
    kill_after_checkpoint_at_step: Optional[int] = None
    # These steps compute a NaN loss (a numerical blow-up).
    nan_loss_at_steps: list[int] = field(default_factory=list)
    # Every rank raises an exception in this step's forward (a bug, an out-of-memory, a library's error).
    raise_at_step: Optional[int] = None


@dataclass
class RunConfig:
    name: str = "sd-repro"
    root: str = "runs"
    dir: str = "${run.root}/${run.name}/${stage.name}"
    seed: int = 0


@dataclass
class TrainConfig:
    # "ddp", "fsdp" (FSDP2) or "deepspeed".
    backend: str = "fsdp"
    run: RunConfig = field(default_factory=RunConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


class ConfigError(ValueError):
    pass


def accumulation_steps(global_batch: int, world_size: int, micro_batch: int) -> int:
    """Micro-batches per optimiser step so that world * micro * accum == global batch, exactly."""
    per_step = world_size * micro_batch
    if global_batch % per_step:
        options = [m for m in range(1, global_batch // world_size + 1)
                   if (global_batch // world_size) % m == 0 and global_batch % world_size == 0]
        hint = (f"micro_batch in {options[:12]}" if options
                else f"a world size that divides {global_batch}")
        raise ConfigError(
            f"stage.global_batch={global_batch} is not a multiple of world_size ({world_size}) x "
            f"stage.micro_batch ({micro_batch}) = {per_step}; choose {hint}")
    return global_batch // per_step


def stage_seed(cfg: TrainConfig) -> int:
    """The seed of a stage's data order, caption dropout and diffusion noise: run.seed mixed with the stage's
    name. sd-v1-3 trains on the shards sd-v1-2 read; on run.seed alone it would replay v1-2's sample order and
    noise draws step for step. The initial weights (and a random frozen part) keep run.seed itself."""
    import hashlib

    key = f"stage/{cfg.run.seed}/{cfg.stage.name}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") >> 1


def loader_config(cfg: TrainConfig, pin_memory: bool = False):
    """The stage's data settings as the loader's config (data.loader.LoaderConfig)."""
    from data.filters_runtime import stage_filter
    from data.loader import LoaderConfig

    data = cfg.stage.data
    return LoaderConfig(shards=data.shards, resolution=data.resolution, batch_size=cfg.stage.micro_batch,
                        num_workers=data.num_workers, seed=stage_seed(cfg), caption_dropout=data.caption_dropout,
                        crop=data.crop, filters=stage_filter(data.subset) if data.subset else None,
                        latents=data.latents, context=data.context, shuffle_buffer=data.shuffle_buffer,
                        shards_per_group=data.shards_per_group, pin_memory=pin_memory, timeout_s=data.timeout_s,
                        max_unreadable_in_a_row=data.max_unreadable_in_a_row)


def check_shards_exist(cfg: TrainConfig) -> None:
    """Every local shard the stage names is there (a typo in a path or a brace range, or shards not yet
    downloaded). Called on one rank at start-up, before the models are built."""
    from data.loader import expand_shards, missing_local_shards

    data = cfg.stage.data
    for setting, shards in (("stage.data.shards", data.shards), ("stage.data.val_shards", data.val_shards)):
        if shards is None:
            continue
        urls = expand_shards(shards)
        missing = missing_local_shards(urls)
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            remote = any("://" in url.removeprefix("file:") for url in missing)
            fix = ("the loader reads local paths and pipe: commands: write s3://bucket/00000.tar as "
                   "'pipe:aws s3 cp s3://bucket/00000.tar -'" if remote else
                   "check the folder and the brace range, or list only the shards that exist")
            raise ConfigError(f"{setting}: {len(missing)} of its {len(urls)} shards are not there ({shown}); {fix}")


def check_frozen_sources(cfg: TrainConfig, on_disk: bool = True) -> None:
    """SD v1 trains on a pretrained VAE's latents and a pretrained CLIP's features: a stage that starts
    from scratch must say where they come from (a later stage takes them from stage.init.from_checkpoint).
    With `on_disk`, each source named must be there. Called at start-up before the models are built, and by
    the launcher before it submits (not in validate(): the benchmarks build sd-v1 with random frozen parts)."""
    model = cfg.model
    parts = {"model.pretrained_vae": model.pretrained_vae, "model.pretrained_text_encoder": model.pretrained_text_encoder}
    given = [key for key, value in parts.items() if value]
    if model.pretrained_first_stage and given:
        raise ConfigError(f"model.pretrained_first_stage and {' and '.join(given)} both name a source of the frozen "
                          "parts: give the one SD checkpoint, or the VAE and the text encoder each, not both")
    if model.arch == "sd-v1" and cfg.stage.init.from_checkpoint is None and not model.pretrained_first_stage \
            and len(given) < 2:
        lacking = " and ".join(key for key in parts if key not in given)
        raise ConfigError(f"model.arch=sd-v1 from scratch needs its frozen parts pretrained; {lacking} not set: give "
                          "model.pretrained_first_stage=PATH (an SD v1 .ckpt), or model.pretrained_vae=PATH (kl-f8's "
                          "model.ckpt) and model.pretrained_text_encoder=DIR (openai/clip-vit-large-patch14)")
    if on_disk:
        for key, value in {"model.pretrained_first_stage": model.pretrained_first_stage, **parts}.items():
            if value and not os.path.exists(os.path.expanduser(value)):
                raise ConfigError(f"{key}={value}: nothing is there")


def _numbers_out_of_range(cfg: TrainConfig) -> list[str]:
    """Numeric settings outside the range they mean something in. Each would otherwise surface late and
    garbled (a modulo by zero at the first step, torch's AdamW refusing the LR) or not at all (a negative
    warmup, an EMA decay above 1, a stage of -3 steps that "finishes" at once)."""
    o, s, c, t, ema = cfg.optim, cfg.stage, cfg.checkpoint, cfg.tracking, cfg.ema
    rules = [
        ("stage.steps", s.steps, s.steps >= 1, ">= 1"),
        ("stage.global_batch", s.global_batch, s.global_batch >= 1, ">= 1"),
        ("stage.micro_batch", s.micro_batch, s.micro_batch >= 1, ">= 1"),
        ("optim.lr", o.lr, o.lr >= 0, ">= 0"),
        ("optim.beta1", o.beta1, 0 <= o.beta1 < 1, "in [0, 1)"),
        ("optim.beta2", o.beta2, 0 <= o.beta2 < 1, "in [0, 1)"),
        ("optim.eps", o.eps, o.eps > 0, "> 0"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0 (0: no warmup)"),
        ("optim.warmup_start", o.warmup_start, 0 <= o.warmup_start <= 1, "in [0, 1] (a multiplier of optim.lr)"),
        ("optim.grad_clip", o.grad_clip, o.grad_clip is None or o.grad_clip > 0, "> 0, or null for no clipping"),
        ("ema.max_decay", ema.max_decay, 0 <= ema.max_decay < 1, "in [0, 1)"),
        ("checkpoint.every_steps", c.every_steps, c.every_steps >= 1, ">= 1"),
        ("checkpoint.keep_every", c.keep_every, c.keep_every >= 0, ">= 0 (0: none)"),
        ("checkpoint.max_nonfinite_in_a_row", c.max_nonfinite_in_a_row, c.max_nonfinite_in_a_row >= 1, ">= 1"),
        ("tracking.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("tracking.sample_every", t.sample_every, t.sample_every >= 0, ">= 0 (0: never)"),
        ("tracking.val_every", t.val_every, t.val_every >= 0, ">= 0 (0: never)"),
    ]
    return [f"{name}={value} must be {allowed}" for name, value, ok, allowed in rules if not ok]


def validate(cfg: TrainConfig, world_size: int) -> int:
    """Check the composed config; returns the gradient-accumulation steps."""
    out_of_range = _numbers_out_of_range(cfg)
    if out_of_range:
        raise ConfigError("; ".join(out_of_range))
    if cfg.backend not in ("ddp", "fsdp", "deepspeed"):
        raise ConfigError(f"backend={cfg.backend!r}: choose ddp, fsdp or deepspeed")
    if cfg.parallel.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"parallel.precision={cfg.parallel.precision!r}: choose bf16, fp16 or fp32")
    if cfg.parallel.compile_backend not in ("inductor", "aot_eager", "eager"):
        raise ConfigError(f"parallel.compile_backend={cfg.parallel.compile_backend!r}: choose inductor, aot_eager "
                          "or eager")
    if cfg.parallel.reduce_dtype not in REDUCE_DTYPES:
        raise ConfigError(f"parallel.reduce_dtype={cfg.parallel.reduce_dtype!r}: choose {' or '.join(REDUCE_DTYPES)}")
    if cfg.backend == "deepspeed" and cfg.parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={cfg.parallel.zero_stage}: DeepSpeed ZeRO stage must be 1, 2 or 3")
    if cfg.optim.scale_lr:
        raise ConfigError("optim.scale_lr=true multiplies the LR by the batch size (CompVis' --scale_lr); SD v1 "
                          "trained at lr 1e-4 unscaled and runs with it on failed to converge. Set it to false.")
    if cfg.ema.update_every not in ("step", "micro_batch"):
        raise ConfigError(f"ema.update_every={cfg.ema.update_every!r}: choose step or micro_batch")
    init = cfg.stage.init
    if not init.restart_warmup and not (init.from_checkpoint and init.step):
        raise ConfigError("stage.init.restart_warmup=false continues the LR warmup from the carried step, but no step "
                          "is carried (it needs stage.init.from_checkpoint and stage.init.step=true): set "
                          "stage.init.step=true, or restart_warmup=true to warm up from zero")
    sd = cfg.model.sd_config()
    multiple = sd.vae.downsample_factor * 2 ** (len(sd.unet.channel_mult) - 1)
    if cfg.stage.data.resolution < multiple or cfg.stage.data.resolution % multiple:
        raise ConfigError(f"stage.data.resolution={cfg.stage.data.resolution} must be a positive multiple of {multiple} "
                          f"(VAE factor {sd.vae.downsample_factor} x UNet downsampling "
                          f"{2 ** (len(sd.unet.channel_mult) - 1)})")
    if not 0.0 <= cfg.stage.data.caption_dropout < 1.0:
        raise ConfigError(f"stage.data.caption_dropout={cfg.stage.data.caption_dropout} must be in [0, 1)")
    if cfg.stage.data.precompute_from is not None and not cfg.stage.data.latents:
        raise ConfigError(f"stage.data.precompute_from={cfg.stage.data.precompute_from!r} makes latent shards, but "
                          "stage.data.latents=false reads images: set latents=true (and stage.data.shards to where "
                          "the latents go), or remove precompute_from")
    try:  # the loader checks its own settings (and the subset's name); say which of ours set them
        loader_config(cfg)
    except ValueError as err:
        raise ConfigError(f"stage.data.* sets {err}") from err
    if cfg.checkpoint.export is not None and cfg.checkpoint.export != "latest" \
            and not (cfg.checkpoint.export.isdigit() and int(cfg.checkpoint.export) > 0):
        raise ConfigError(f"checkpoint.export={cfg.checkpoint.export!r}: give latest, or the step of a checkpoint "
                          "the run kept (see <run.dir>/checkpoints)")
    if cfg.checkpoint.keep_every % cfg.checkpoint.every_steps:
        raise ConfigError(f"checkpoint.keep_every={cfg.checkpoint.keep_every} is not a multiple of "
                          f"checkpoint.every_steps={cfg.checkpoint.every_steps}: checkpoints are saved at multiples of "
                          "every_steps only, so make it one")
    if cfg.checkpoint.keep_last < 2:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last}: keep at least 2 so a crash while "
                          "saving leaves a loadable one")
    if cfg.tracking.wandb_mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"tracking.wandb_mode={cfg.tracking.wandb_mode!r}: choose online, offline or disabled")
    if cfg.tracking.val_every and not cfg.stage.data.val_shards:
        raise ConfigError(f"tracking.val_every={cfg.tracking.val_every} needs held-out shards: set "
                          "stage.data.val_shards, or tracking.val_every=0")
    if cfg.stage.data.val_shards and not cfg.tracking.val_every:
        raise ConfigError(f"stage.data.val_shards={cfg.stage.data.val_shards!r} is never read with "
                          "tracking.val_every=0: set tracking.val_every=N (steps), or remove val_shards")
    if cfg.tracking.sample_weights not in ("ema", "raw"):
        raise ConfigError(f"tracking.sample_weights={cfg.tracking.sample_weights!r}: choose ema or raw")
    if cfg.tracking.sample_every and cfg.tracking.sample_weights == "ema" and not cfg.ema.enabled:
        raise ConfigError("tracking.sample_every draws grids with the EMA weights (tracking.sample_weights=ema), "
                          "but ema.enabled=false: set tracking.sample_weights=raw, or enable the EMA")
    expected = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if world_size != expected:
        raise ConfigError(f"{world_size} processes are running but cluster={cfg.cluster.name} says "
                          f"{cfg.cluster.nodes} nodes x {cfg.cluster.gpus_per_node} = {expected}; "
                          f"set cluster.nodes / cluster.gpus_per_node to what you launched")
    return accumulation_steps(cfg.stage.global_batch, world_size, cfg.stage.micro_batch)
