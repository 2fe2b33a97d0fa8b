"""Stage boundaries: initialise a stage from the previous one, and export a finished stage.

An export is `<run.dir>/export/model.ckpt` in the original layout (raw UNet in model.diffusion_model.*,
EMA in model_ema.*, plus the VAE, text encoder and schedule), which `tools.convert` turns into
safetensors or a diffusers folder, and which the next stage reads with `stage.init.from_checkpoint`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.adapters import ldm_checkpoint as ldm
from models.adapters.keys import load_strict
from models.pretrained_parts import text_encoder_state_dict, vae_state_dict
from models.stable_diffusion import load_ldm_checkpoint
from train.config import ConfigError
from train.disk_space import check_room, named_if_disk_full

EXPORT_FILE = "model.ckpt"
EXPORT_RECORD = "export.json"  # beside it: the step, the model.arch and the stage that wrote it


@dataclass
class StageInit:
    ema: dict[str, torch.Tensor] | None = None
    ema_num_updates: int = 0
    step: int = 0


def _checkpoint_file(path: str, setting: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / EXPORT_FILE
    if not p.is_file():
        raise ConfigError(f"{setting}={path}: no {EXPORT_FILE} there; point it at a finished "
                          "stage's <run.dir>/export or at an original .ckpt")
    return p


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A file, a diffusers folder (model_index.json), or a trainer export folder (`<run.dir>/export`,
    holding model.ckpt in the original layout) -> the path to load."""
    path = Path(source)
    if path.is_dir() and not (path / "model_index.json").is_file():
        if (path / EXPORT_FILE).is_file():
            return path / EXPORT_FILE
        raise FileNotFoundError(f"{path}: neither a diffusers folder (model_index.json) nor a trainer export "
                                f"({EXPORT_FILE})")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def checkpoint_arch(checkpoint: Path, arch: str | None) -> str:
    """The architecture to build for an original-layout file: the one asked for, else the one a trainer
    export names in its export.json, else SD v1's. An export of another architecture than the one asked
    for is refused here, before a strict load would list every key."""
    record = checkpoint.parent / EXPORT_RECORD
    exported = json.loads(record.read_text()).get("arch") if checkpoint.name == EXPORT_FILE and record.is_file() \
        else None
    if arch is not None and exported is not None and arch != exported:
        raise ValueError(f"{checkpoint} was exported by a run of arch {exported!r} ({record}), not {arch!r}: "
                         f"leave out --arch, or pass --arch {exported}")
    return arch or exported or "sd-v1"


def load_stage_init(cfg, sd_cfg, models) -> StageInit:
    """Load what `stage.init` says to carry into `models` (before the UNet is wrapped)."""
    init = cfg.stage.init
    if cfg.model.pretrained_first_stage:
        src = load_ldm_checkpoint(_checkpoint_file(cfg.model.pretrained_first_stage, "model.pretrained_first_stage"),
                                  sd_cfg)
        load_strict(models.vae, src.vae.state_dict(), "VAE")
        load_strict(models.text_encoder, src.text_encoder.state_dict(), "text encoder")
    if cfg.model.pretrained_vae:
        load_strict(models.vae, vae_state_dict(cfg.model.pretrained_vae, sd_cfg.vae), "VAE")
    if cfg.model.pretrained_text_encoder:
        state = text_encoder_state_dict(cfg.model.pretrained_text_encoder, sd_cfg.text)
        load_strict(models.text_encoder, state, "text encoder")
    if init.from_checkpoint is None:
        return StageInit()
    if init.optimizer:
        raise ConfigError("stage.init.optimizer=true: carrying AdamW moments across stages is not supported (an "
                          "export holds weights and EMA, not the optimiser); set it to false, and keep "
                          "stage.init.restart_warmup=true so the fresh optimiser warms up (the v1-1 256->512 change "
                          "of resolution is a new stage too)")
    src = load_ldm_checkpoint(_checkpoint_file(init.from_checkpoint, "stage.init.from_checkpoint"), sd_cfg)
    # The frozen parts always come along: a stage must see the latents its predecessor was trained on.
    load_strict(models.vae, src.vae.state_dict(), "VAE")
    load_strict(models.text_encoder, src.text_encoder.state_dict(), "text encoder")
    raw = src.unet.state_dict()
    if init.weights:
        load_strict(models.unet, raw, "UNet")
    ema = None
    if init.ema:
        ema = src.unet_ema if src.unet_ema is not None else raw  # EMA-only files hold the EMA as the one copy
    # The EMA's own update count comes with it, whatever init.step says (LitEma keeps num_updates as a buffer
    # beside the weights): its decay (1 + n) / (10 + n) restarted at n = 0 would replace the carried average
    # by the new weights within ten updates. Files that record no count (a diffusers conversion) give the step
    # they were saved at, one update per step as LitEma's.
    ema_updates = 0
    if init.ema:
        ema_updates = src.ema_num_updates if src.ema_num_updates is not None else int(src.global_step or 0)
    return StageInit(ema=ema, ema_num_updates=ema_updates, step=int(src.global_step or 0) if init.step else 0)


def export_stage(trainer, out_dir: Path, checkpoint: Path | None = None) -> Path | None:
    """All ranks call this (gathering shards is collective); rank 0 writes. `checkpoint`: the checkpoint
    exported as it is (recorded in export.json), rather than the end of the stage."""
    full = trainer.engine.full_state_dict()
    ema_full = trainer.engine.full_ema_state_dict(trainer.ema.shadow) if trainer.ema is not None else None
    if not trainer.env.is_main:
        return None
    # Contiguous (NCHW) as the released files: a channels-last UNet's tensors would keep their NHWC strides
    # through torch.save, and safetensors refuses non-contiguous tensors.
    full = {k: v.contiguous() for k, v in full.items()}
    ema_full = {k: v.contiguous() for k, v in ema_full.items()} if ema_full is not None else None
    weights = ldm.LDMWeights(
        unet=full, vae=trainer.frozen.vae.state_dict(), text_encoder=trainer.frozen.text_encoder.state_dict(),
        schedule=trainer.schedule.state_dict(), unet_ema=ema_full,
        ema_decay=trainer.cfg.ema.max_decay, ema_num_updates=trainer.ema.num_updates if trainer.ema else 0,
        global_step=trainer.state.step)
    sd = ldm.join_state_dict(weights, position_ids=trainer.sd_cfg.text.max_position_embeddings)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    what = f"the export {out_dir / EXPORT_FILE}"
    advice = ("Make room and run the export again." if checkpoint is not None else
              "The stage's training is done and its last checkpoint saved: make room and start the run again with "
              "the same settings; it resumes at its last step and writes the export.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_room(out_dir.parent, sum(t.numel() * t.element_size() for t in sd.values()), what, advice)
    tmp.mkdir(parents=True)
    try:
        ldm.write_checkpoint(tmp / EXPORT_FILE, sd, trainer.state.step)
    except (OSError, RuntimeError) as err:
        named = named_if_disk_full(err, out_dir.parent, what, advice)  # while the partial file fills the disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise named
    record = {"step": trainer.state.step, "arch": trainer.cfg.model.arch, "stage": trainer.cfg.stage.name}
    if checkpoint is not None:
        record["checkpoint"] = str(checkpoint)
    (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir / EXPORT_FILE


def export_checkpoint(cfg, env, config_dict: dict) -> int:
    """`checkpoint.export=latest|STEP`: that checkpoint of the run as <run.dir>/exports/step-N, in the stage
    export's layout (tools.sample / tools.evaluate / tools.convert read it), to evaluate a stage while it
    trains, after it stopped, or at the steps it kept (checkpoint.keep_every). It goes through the trainer's
    own resume, so any backend and any number of ranks can read a checkpoint of any other number (e.g. one
    process on a CPU: cluster.device=cpu), and the frozen parts come from where the stage takes them. Give
    the stage's own settings (arch, shards, stage.init, the pretrained parts): the resume checks the data
    position against them. Nothing is trained or logged, and the run's status is left as it is (DeepSpeed
    partitions read on another number of ranks leave their universal conversion beside the checkpoint, as
    any such resume does)."""
    from train.checkpoint import latest_checkpoint, saved_steps
    from train.trainer import Trainer

    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    # Found before minutes of model building.
    if cfg.checkpoint.export == "latest":
        chosen = latest_checkpoint(ckpt_dir)
        if chosen is None:
            raise ConfigError(f"checkpoint.export=latest: no checkpoint in {ckpt_dir}: give the stage's run.dir")
    else:
        kept = saved_steps(ckpt_dir)
        chosen = kept.get(int(cfg.checkpoint.export))
        if chosen is None:
            there = ", ".join(str(step) for step in kept) or "none"
            raise ConfigError(f"checkpoint.export={cfg.checkpoint.export}: no such checkpoint in {ckpt_dir} (steps "
                              f"there: {there}); checkpoint.keep_every=N keeps the multiples of N")
    data = replace(cfg.stage.data, val_shards=None)
    quiet = replace(cfg, stage=replace(cfg.stage, data=data),
                    tracking=replace(cfg.tracking, wandb_mode="disabled", val_every=0, sample_every=0),
                    # whatever cluster trained it: these processes are the world now
                    cluster=replace(cfg.cluster, nodes=1, gpus_per_node=env.world_size))
    trainer = Trainer(quiet, env, config_dict, checkpoint=chosen)
    try:
        out = trainer.run_dir / "exports" / f"step-{trainer.state.step}"
        path = export_stage(trainer, out, checkpoint=trainer.resumed_from)
    finally:
        trainer.stop_loader()
    if path is not None:
        print(f"exported {trainer.resumed_from} -> {path}", flush=True)
    return 0
