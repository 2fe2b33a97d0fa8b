"""The training loop: batch -> encode (frozen) -> noise -> predict -> loss -> step -> EMA -> log -> checkpoint.

`run(cfg)` is the whole job for one stage on one rank; `python -m train` composes the config and
calls it under torchrun (or SLURM) on every rank.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data.loader import LoaderConfig, ShardLoader
from models.stable_diffusion import build_models
from train import checkpoint as ckpt
from train.config import TrainConfig, validate
from train.distributed import DistEnv, all_reduce_max, barrier, init_distributed
from train.ema import EMA
from train.export import export_stage, load_stage_init, shard_like
from train.flops import peak_tflops, unet_train_flops_per_image
from train.parallel import build_engine
from train.signals import REQUEUE_EXIT_CODE, PreemptionFlag
from train.status import write_status
from train.step import FrozenParts, training_loss


def _loader_config(cfg: TrainConfig, text_dim: int) -> LoaderConfig:
    data = cfg.stage.data
    filters = None
    if data.subset:
        from data.filters_runtime import stage_filter

        filters = stage_filter(data.subset)
    return LoaderConfig(shards=data.shards, resolution=data.resolution, batch_size=cfg.stage.micro_batch,
                        num_workers=data.num_workers, seed=cfg.run.seed, caption_dropout=data.caption_dropout,
                        crop=data.crop, filters=filters, latents=data.latents, context=data.context,
                        shuffle_buffer=data.shuffle_buffer, shards_per_group=data.shards_per_group)


def _reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _all_finite(loss: torch.Tensor) -> bool:
    """Every rank must take the same decision, or the ranks' optimiser states diverge."""
    flag = torch.isfinite(loss).all().float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv, config_dict: dict):
        self.cfg, self.env = cfg, env
        self.accumulation = validate(cfg, env.world_size)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if env.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        if env.device.type == "cuda" and cfg.parallel.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.sd_cfg = cfg.model.sd_config()
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        models = build_models(self.sd_cfg)
        init = load_stage_init(cfg, self.sd_cfg, models)  # weights (and EMA) from the previous stage
        self.frozen = FrozenParts(models.vae.to(env.device), models.text_encoder.to(env.device),
                                  self.sd_cfg.vae.scale_factor)
        self.schedule = models.schedule.to(env.device)
        lr_offset = 0 if cfg.stage.init.restart_warmup else init.step
        self.engine = build_engine(cfg, models.unet, env, self.accumulation, lr_offset)
        self.ema = None
        if cfg.ema.enabled:
            self.ema = EMA(self.engine.named_trainable(), cfg.ema.max_decay)
            if init.ema is not None:
                self.ema.load_state_dict({"num_updates": init.ema_num_updates, "max_decay": cfg.ema.max_decay,
                                          "shadow": shard_like(init.ema, self.engine.named_trainable())})
        self.loader = ShardLoader(_loader_config(cfg, self.sd_cfg.text.hidden_size), env.rank, env.world_size)
        # Distinct diffusion noise per rank (and per stage), reproducible.
        self.generator = torch.Generator(env.device).manual_seed(cfg.run.seed * 1_000_003 + env.rank + 1)
        # The step counter is global across stages when a stage carries it; this stage ends `steps` later.
        self.state = ckpt.TrainState(step=init.step, extra={"stage_start": init.step})
        self.resumed_from = self._resume()

        from train.tracking import Tracker

        self.tracker = Tracker(cfg.tracking, self.run_dir, config_dict, self.state.wandb_run_id, env.rank,
                               resume=self.resumed_from is not None)
        self.state.wandb_run_id = self.tracker.run_id
        self.flops_per_image = unet_train_flops_per_image(self.sd_cfg.unet, cfg.stage.data.resolution // 8)

    # -- checkpoints -----------------------------------------------------------------------------
    def _rank_state(self) -> dict:
        return {"ema": self.ema.state_dict() if self.ema else None, "generator": self.generator.get_state(),
                "loader": self.loader.state_dict(), "rng": ckpt.rng_state()}

    def _resume(self) -> Path | None:
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if latest is None:
            return None
        self.state, rank_state = ckpt.load_checkpoint(latest, self.engine, self.env.rank, self.env.world_size)
        if self.ema is not None:
            self.ema.load_state_dict(rank_state["ema"])
        self.generator.set_state(rank_state["generator"])
        self.loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        if self.env.is_main:
            print(f"resumed from {latest} at step {self.state.step}", flush=True)
        return latest

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.ckpt_dir, self.state, self.engine, self._rank_state(), self.env.rank,
                                    self.env.world_size, self.cfg.checkpoint.keep_last)

    def _status(self, state: str) -> None:
        if self.env.is_main:
            write_status(self.run_dir, state, self.state.step, self.state.extra["stage_start"] + self.cfg.stage.steps,
                         self.state.last_loss,
                         samples_seen=self.state.samples_seen)

    # -- the loop --------------------------------------------------------------------------------
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        times = self.accumulation if self.cfg.ema.update_every == "micro_batch" else 1
        params = self.engine.named_trainable()
        for _ in range(times):
            self.ema.update(params)

    def train(self) -> int:
        from train.meters import ThroughputMeter
        from train.progress import Progress, format_summary

        cfg, env, state = self.cfg, self.env, self.state
        total = state.extra["stage_start"] + cfg.stage.steps
        flag = PreemptionFlag()
        meter = ThroughputMeter(env.world_size, self.flops_per_image,
                                peak_tflops(env.device, cfg.parallel.precision))
        progress = Progress(cfg.tracking, total, start_step=state.step, rank=env.rank)
        encode_autocast = (torch.autocast(env.device.type, dtype=self.engine.dtype)
                           if self.engine.dtype != torch.float32 else contextlib.nullcontext())
        batches = iter(self.loader)
        self._status("running")
        meter.reset()  # the first window starts here, not at start-up
        started, start_step, exit_code = time.perf_counter(), state.step, 0
        window_losses: list[torch.Tensor] = []
        grad_norm = torch.zeros(())
        while state.step < total:
            losses = []
            for micro in range(self.accumulation):
                with meter.waiting_for_data():
                    batch = next(batches)
                loss = training_loss(batch, self.engine.module, self.frozen, self.schedule, env.device,
                                     self.generator, encode_autocast, self.engine.autocast())
                if state.step in cfg.fault.nan_loss_at_steps:
                    loss = loss * float("nan")
                self.engine.backward(loss, last_micro_batch=micro == self.accumulation - 1)
                losses.append(loss.detach())
                meter.step_done(cfg.stage.micro_batch)
            step_loss = torch.stack(losses).mean()
            if _all_finite(step_loss):
                grad_norm = self.engine.step()
                self._update_ema()
                state.nonfinite_in_a_row = 0
                window_losses.append(step_loss)
            else:
                self.engine.skip_step()
                state.nonfinite_skipped += 1
                state.nonfinite_in_a_row += 1
                if env.is_main:
                    print(f"step {state.step}: non-finite loss, update skipped "
                          f"({state.nonfinite_in_a_row} in a row)", flush=True)
            state.step += 1
            state.samples_seen += cfg.stage.global_batch
            progress.step(state.step)

            if state.nonfinite_in_a_row >= cfg.checkpoint.max_nonfinite_in_a_row:
                self.save()
                self._status("failed")
                if env.is_main:
                    print(f"aborting: {state.nonfinite_in_a_row} non-finite losses in a row; checkpoint saved",
                          flush=True)
                exit_code = 1
                break
            if state.step % cfg.tracking.log_every == 0 or state.step == total:
                self._log(window_losses, grad_norm, meter, progress)
                window_losses = []
            if cfg.tracking.sample_every and state.step % cfg.tracking.sample_every == 0:
                self._log_samples()
            preempted = all_reduce_max(1.0 if flag.set else 0.0, env.device) > 0
            if preempted or state.step % cfg.checkpoint.every_steps == 0:
                path = self.save()
                if state.step == cfg.fault.kill_after_checkpoint_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if preempted:
                    self._status("preempted")
                    if env.is_main:
                        print(f"pre-emption signal: checkpointed {path}; exiting {REQUEUE_EXIT_CODE} to be requeued",
                              flush=True)
                    exit_code = REQUEUE_EXIT_CODE
                    break
        else:
            latest = ckpt.latest_checkpoint(self.ckpt_dir)
            if latest is None or latest.name != f"step-{state.step}":
                self.save()
            if cfg.checkpoint.export_on_finish:
                export_stage(self, self.run_dir / "export")
            self._status("finished")
        progress.close()
        elapsed = time.perf_counter() - started
        if env.is_main:
            summary = {"steps": state.step, "samples_seen": state.samples_seen, "final_loss": state.last_loss,
                       "mean_img_per_s": (state.step - start_step) * cfg.stage.global_batch / max(elapsed, 1e-9),
                       "wall_time_s": elapsed, "skipped_updates": state.nonfinite_skipped,
                       "skipped_samples": self.loader.skip_counts(),
                       "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_dir))}
            print(format_summary(summary), flush=True)
            self.tracker.summary(summary)
        self.tracker.finish(exit_code)
        return exit_code

    def _log(self, window_losses, grad_norm, meter, progress) -> None:
        """The only host sync of the loop (besides the finiteness vote): once per log window."""
        state = self.state
        if window_losses:
            loss = _reduce_mean(torch.stack(window_losses).mean()).item()
            state.last_loss = loss
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()
        metrics = {"train/loss": state.last_loss, "train/lr": self.engine.lr(),
                   "train/grad_norm": float(grad_norm), "train/samples_seen": state.samples_seen,
                   "train/nonfinite_skipped": state.nonfinite_skipped, **meter.window()}
        for reason, count in self.loader.skip_counts().items():
            metrics[f"data/skipped/{reason}"] = count
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self.tracker.log(metrics, step=state.step)
        progress.log(state.step, loss=state.last_loss, lr=metrics["train/lr"],
                     img_per_s=metrics.get("throughput/img_per_s"))
        self._status("running")


    @torch.no_grad()
    def _log_samples(self, steps: int = 20, scale: float = 3.0) -> None:
        """A grid from the fixed prompts (DDIM, classifier-free guidance, current raw weights, fixed seeds).

        Every rank runs it: under FSDP2 and ZeRO-3 the forward pass is collective."""
        from models.guidance import ClassifierFreeGuidance
        from models.samplers import ddim_sample, ddim_timesteps, initial_noise
        from models.tokenizer import CLIPTokenizer

        prompts = list(self.cfg.tracking.sample_prompts)
        tokenizer = CLIPTokenizer()
        device = self.env.device
        context = self.frozen.text_encoder(tokenizer(prompts).to(device)).float()
        uncond = self.frozen.text_encoder(tokenizer([""]).to(device)).float()
        self.engine.unet.eval()
        try:
            with self.engine.autocast():
                guided = ClassifierFreeGuidance(self.engine.module, uncond, scale)
                latent = self.cfg.stage.data.resolution // self.sd_cfg.vae.downsample_factor
                x = initial_noise(range(len(prompts)), (self.sd_cfg.unet.in_channels, latent, latent)).to(device)
                z = ddim_sample(guided, x, ddim_timesteps(steps), context,
                                alphas_cumprod=self.schedule.alphas_cumprod)
            images = self.frozen.vae.decode_latents(z)
        finally:
            self.engine.unet.train()
        self.tracker.log_images("samples", ((images.float() + 1) / 2).clamp(0, 1).cpu(), prompts, self.state.step)


def run(cfg: TrainConfig, config_dict: dict) -> int:
    env = init_distributed(cfg.cluster.device)
    trainer = Trainer(cfg, env, config_dict)
    code = trainer.train()
    if env.is_main:
        (trainer.run_dir / "last_exit.json").write_text(json.dumps({"exit_code": code, "step": trainer.state.step}))
    return code
