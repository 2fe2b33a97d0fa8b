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

from data.loader import ShardLoader
from models.stable_diffusion import build_models
from train import checkpoint as ckpt
from train.config import TrainConfig, check_frozen_sources, check_shards_exist, loader_config, stage_seed, validate
from train.distributed import DistEnv, StoppedByOtherRank, all_reduce_sum_, barrier, init_distributed, on_rank_zero
from train.ema import EMA
from train.export import export_stage, load_stage_init
from train.flops import (peak_tflops, text_encode_flops_per_caption, unet_train_flops_per_image,
                         vae_encode_flops_per_image)
from train.parallel import build_engine
from train.run_lock import hold_run_dir
from train.signals import REQUEUE_EXIT_CODE, PreemptionFlag
from train.status import write_status
from train.step import FrozenParts, training_loss
from train.step_results import PendingStep, StepCounters, StepOutcome, vote


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv, config_dict: dict, checkpoint: Path | None = None):
        """`checkpoint`: resume from this one rather than the latest (an export of a kept step only: training
        on from it would save steps below the latest, which the pruning of old checkpoints would delete)."""
        self.cfg, self.env = cfg, env
        self.accumulation = validate(cfg, env.world_size)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if env.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.parallel.tf32
            torch.backends.cudnn.benchmark = cfg.parallel.cudnn_benchmark

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
                                          "shadow": self.engine.local_pieces(init.ema)})
        self.loader = ShardLoader(loader_config(cfg, pin_memory=env.device.type == "cuda"), env.rank,
                                  env.world_size)  # pinned: the step's copies to the GPU need not wait
        self._batches = None  # train()'s iteration of the loader, ended by stop_loader()
        # Distinct diffusion noise per rank and per stage, reproducible.
        self.generator = torch.Generator(env.device).manual_seed(stage_seed(cfg) * 1_000_003 + env.rank + 1)
        # The step counter is global across stages when a stage carries it; this stage ends `steps` later.
        self.state = ckpt.TrainState(step=init.step, extra={"stage_start": init.step})
        self.resumed_from = self._resume(checkpoint)

        from train.tracking import Tracker

        self.tracker = Tracker(cfg.tracking, self.run_dir, config_dict, self.state.wandb_run_id, env.rank,
                               resume=self.resumed_from is not None)
        self.state.wandb_run_id = self.tracker.run_id
        self.validator = self._build_validator() if cfg.tracking.val_every else None
        self.flops_per_image = unet_train_flops_per_image(self.sd_cfg.unet, cfg.stage.data.resolution // 8)
        self.encoder_flops_per_image = self._encoder_flops_per_image()

    def _build_validator(self):
        from data.filters_runtime import stage_filter
        from data.held_out import HeldOut
        from train.validation import Validator

        cfg, env, data = self.cfg, self.env, self.cfg.stage.data
        held_out = HeldOut(data.val_shards, env.rank, env.world_size, cfg.stage.micro_batch, data.resolution,
                           data.latents, data.context, stage_filter(data.subset) if data.subset else None)
        unet = self.sd_cfg.unet
        validator = Validator(held_out, self.frozen, self.schedule, env.device, self._encode_autocast(),
                              (unet.in_channels, data.resolution // 8, data.resolution // 8),
                              (self.sd_cfg.text.max_position_embeddings, unet.context_dim))
        if env.is_main:
            skipped = f" (not used: {dict(validator.skips)})" if validator.skips else ""
            print(f"validation: {validator.samples} held-out samples every {cfg.tracking.val_every} steps{skipped}",
                  flush=True)
        return validator

    def _encode_autocast(self):
        """The frozen encoders run under the training precision's autocast (fp32: none)."""
        if self.engine.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.engine.dtype)

    # -- checkpoints -----------------------------------------------------------------------------
    def _rank_state(self) -> dict:
        return {"ema": self.ema.state_dict() if self.ema else None, "generator": self.generator.get_state(),
                "loader": self.loader.state_dict(), "rng": ckpt.rng_state()}

    def _resume(self, checkpoint: Path | None) -> Path | None:
        latest = checkpoint or ckpt.latest_checkpoint(self.ckpt_dir)
        if latest is None:
            return None
        self.state, saved = ckpt.load_checkpoint(latest, self.engine, self.env.world_size)
        if saved.world_size != self.env.world_size:
            data = self._resume_resized(saved)
            if self.env.is_main:
                print(f"resumed from {latest} (written by {saved.world_size} ranks) at step {self.state.step}; {data}",
                      flush=True)
        else:
            rank_state = saved.load(self.env.rank)
            if self.ema is not None:
                self.ema.load_state_dict(rank_state["ema"])
            self.generator.set_state(rank_state["generator"])
            self.loader.load_state_dict(rank_state["loader"])
            ckpt.set_rng_state(rank_state["rng"])
            if self.env.is_main:
                print(f"resumed from {latest} at step {self.state.step}", flush=True)
        self._apply_configured_settings()
        return latest

    def _apply_configured_settings(self) -> None:
        """A resume restores the saved optimiser hyper-parameters, LR and EMA decay with the state: the config
        wins (lowering optim.lr and resuming after a loss spike must lower it), and rank 0 says what changed."""
        changes = self.engine.apply_optim_config()
        if self.ema is not None and self.ema.max_decay != self.cfg.ema.max_decay:
            changes.append(f"ema.max_decay: {self.ema.max_decay} -> {self.cfg.ema.max_decay}")
            self.ema.max_decay = self.cfg.ema.max_decay
        if changes and self.env.is_main:
            print(f"resume: the config replaces the checkpoint's {'; '.join(changes)} (saved -> configured)",
                  flush=True)

    def _resume_resized(self, saved: ckpt.SavedRanks) -> str:
        """The rest of a resume on another world size (the engine's load resharded model and optimiser):
        the EMA put together from the old ranks' pieces and cut for this rank, the data going on with what
        the old ranks had left, and the random streams begun afresh from (seed, step, rank), as the old
        ranks' streams have no counterpart here. Returns the loader's line for the log."""
        states = saved.load_all()
        if self.ema is not None:
            if states[0]["ema"] is None:
                raise RuntimeError(f"{saved.path} has no EMA (it was trained with ema.enabled=false)")
            whole = ckpt.whole_ema([s["ema"]["shadow"] for s in states], saved.ema_layout, self.engine.full_shapes())
            self.ema.load_state_dict({"num_updates": states[0]["ema"]["num_updates"],
                                      "max_decay": states[0]["ema"]["max_decay"],
                                      "shadow": self.engine.local_pieces(whole)})
        self.generator.manual_seed(ckpt.resized_seed(stage_seed(self.cfg), self.state.step, self.env.rank, "noise"))
        ckpt.seed_everything(ckpt.resized_seed(stage_seed(self.cfg), self.state.step, self.env.rank, "global"))
        return self.loader.load_state_dicts([s["loader"] for s in states])

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.ckpt_dir, self.state, self.engine, self._rank_state(), self.env.rank,
                                    self.env.world_size, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)

    def _status(self, state: str, **extra) -> None:
        if self.env.is_main:
            write_status(self.run_dir, state, self.state.step, self.state.extra["stage_start"] + self.cfg.stage.steps,
                         self.state.last_loss,
                         samples_seen=self.state.samples_seen, **extra)

    # -- the loop --------------------------------------------------------------------------------
    def _update_ema(self, skipped: torch.Tensor) -> None:
        if self.ema is None:
            return
        times = self.accumulation if self.cfg.ema.update_every == "micro_batch" else 1
        params = self.engine.named_trainable()
        for _ in range(times):
            self.ema.update(params, skipped)

    def stop_loader(self) -> None:
        """Ends train()'s iteration of the loader, which stops its workers (data/loader.py), also when train()
        left by an exception: otherwise the rank would not exit, and torchrun could not restart the group."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def optimizer_step(self, micro_batches: list[dict], preempt_requested: bool, encode_autocast) -> StepOutcome:
        """One optimiser step over this rank's micro-batches. Everything is queued on the device and
        nothing waits for it (no `.item()`, no blocking copy): the results come back as device tensors."""
        losses = []
        for micro, batch in enumerate(micro_batches):
            loss = training_loss(batch, self.engine.module, self.frozen, self.schedule, self.env.device,
                                 self.generator, encode_autocast, self.engine.autocast())
            if self.state.step == self.cfg.fault.raise_at_step:
                raise RuntimeError(f"fault.raise_at_step={self.state.step}: an error in the step, injected")
            if self.state.step in self.cfg.fault.nan_loss_at_steps:
                loss = loss * float("nan")
            self.engine.backward(loss, last_micro_batch=micro == len(micro_batches) - 1)
            losses.append(loss.detach())
        step_loss = torch.stack(losses).mean()
        loss_nonfinite, preempted = vote(step_loss, preempt_requested)
        grad_norm, skipped = self.engine.step(skip=loss_nonfinite)
        self._update_ema(skipped)
        return StepOutcome(step_loss, skipped, grad_norm, preempted)

    def _apply(self, pending: PendingStep, meter, progress) -> str | None:
        """The host's side of a finished step: counters, messages, the log window. Returns "abort" or
        "preempt" when the run must stop (the same answer on every rank: the values were reduced)."""
        state, values = self.state, pending.read.result()
        state.nonfinite_skipped = int(values["skipped_total"])
        state.nonfinite_in_a_row = int(values["in_a_row"])
        meter.step_done(self.cfg.stage.micro_batch * self.accumulation)
        if values["skipped"] and self.env.is_main:  # numbered as the progress line and W&B number it
            print(f"step {pending.index + 1}: non-finite loss or gradient, update skipped "
                  f"({state.nonfinite_in_a_row} in a row)", flush=True)
        if "loss" in values:
            self._log(pending.index + 1, values, pending.lr, meter, progress, pending.done_at)
        if state.nonfinite_in_a_row >= self.cfg.checkpoint.max_nonfinite_in_a_row:
            # Kept for the message: the step read after this one (at once, before the save) may change it.
            self._abort_reason = self._abort_reason or (f"{state.nonfinite_in_a_row} non-finite steps in a row "
                                                        f"up to step {pending.index + 1}")
            return "abort"
        return "preempt" if values["preempted"] else None

    def _apply_before_failing(self, pending: PendingStep, meter, progress) -> None:
        try:
            self._apply(pending, meter, progress)
        except Exception as err:  # the device may be gone with the error: the error that ends the run stands
            if self.env.is_main:
                print(f"(step {pending.index + 1}'s results could not be read after the error: {err})", flush=True)

    def _encoder_flops_per_image(self) -> float:
        """The frozen encoders' forward per image, where they run in the loop (not precomputed)."""
        data, sd = self.cfg.stage.data, self.sd_cfg
        flops = 0.0
        if not data.latents and sd.first_stage == "vae":
            flops += vae_encode_flops_per_image(sd.vae, data.resolution)
        if not data.context:
            flops += text_encode_flops_per_caption(sd.text)
        return flops

    def _signalled_before_the_first_step(self, flag: PreemptionFlag) -> bool:
        """Whether any rank got the pre-emption signal during start-up (one collective: every rank answers the
        same, also where the others got it later, which then reaches the first step's vote)."""
        signalled = torch.full((), float(flag.set), device=self.env.device)
        all_reduce_sum_(signalled)
        return bool(signalled.item() > 0)

    def train(self, flag: PreemptionFlag | None = None) -> int:
        """`flag`: the pre-emption flag, set up before start-up (run() does) so that a signal during start-up is
        not the default action's death of one rank while the others train."""
        from train.meters import ThroughputMeter
        from train.progress import Progress, format_summary

        cfg, env, state = self.cfg, self.env, self.state
        total = state.extra["stage_start"] + cfg.stage.steps
        flag = flag or PreemptionFlag()
        if self._signalled_before_the_first_step(flag):
            self._status("preempted")
            if env.is_main:
                print(f"pre-emption signal during start-up: nothing trained since step {state.step}; exiting "
                      f"{REQUEUE_EXIT_CODE} to be requeued", flush=True)
            self.tracker.finish(REQUEUE_EXIT_CODE)
            return REQUEUE_EXIT_CODE
        peak = peak_tflops(env.device, cfg.parallel.precision, cfg.cluster.gpu_name)
        meter = ThroughputMeter(env.world_size, self.flops_per_image, peak,
                                encoder_flops_per_image=self.encoder_flops_per_image)
        progress = Progress(cfg.tracking, total, start_step=state.step, rank=env.rank)
        encode_autocast = self._encode_autocast()
        counters = StepCounters(env.device, state.nonfinite_skipped, state.nonfinite_in_a_row)
        batches = self._batches = iter(self.loader)
        self._status("running")
        meter.reset()  # the first window starts here, not at start-up
        started, start_step, exit_code = time.perf_counter(), state.step, 0
        pending: PendingStep | None = None
        self._abort_reason: str | None = None
        while state.step < total:
            index, lr = state.step, self.engine.lr()
            try:
                with meter.waiting_for_data():
                    micro_batches = [next(batches) for _ in range(self.accumulation)]
                outcome = self.optimizer_step(micro_batches, flag.set, encode_autocast)
            except Exception:
                # The step before finished: its loss and log window are not lost with this one.
                if pending is not None:
                    self._apply_before_failing(pending, meter, progress)
                raise
            state.step += 1
            state.samples_seen += cfg.stage.global_batch
            progress.step(state.step)
            window_closes = state.step % cfg.tracking.log_every == 0 or state.step == total
            record = counters.record(index, outcome, lr, window_closes, env.world_size)
            if env.device.type == "cpu":
                record.done_at = meter.now()  # read a step late, it would end the window a step late
            # The previous step has finished on the device by now (this one is queued behind it): reading
            # it costs no wait. Its verdict acts here, one step late, on every rank alike.
            stop = self._apply(pending, meter, progress) if pending else None
            pending = record
            sample_due = bool(cfg.tracking.sample_every) and state.step % cfg.tracking.sample_every == 0
            val_due = bool(cfg.tracking.val_every) and state.step % cfg.tracking.val_every == 0
            checkpoint_due = state.step % cfg.checkpoint.every_steps == 0
            if stop or checkpoint_due or sample_due or val_due or state.step == total:
                later = self._apply(pending, meter, progress)  # the state is complete before saving
                stop = "abort" if "abort" in (stop, later) else stop or later
                pending = None
            if val_due:
                with meter.paused():
                    self._validate()
            if sample_due:
                with meter.paused():
                    self._log_samples()
            if stop == "abort":
                self.save()
                self._status("failed")
                if env.is_main:
                    print(f"aborting: {self._abort_reason} (read a step late: step {state.step} ran too); "
                          f"checkpoint saved at step {state.step}", flush=True)
                exit_code = 1
                break
            if stop == "preempt" or checkpoint_due:
                with meter.paused():
                    path = self.save()
                if state.step == cfg.fault.kill_after_checkpoint_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop == "preempt":
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

    def _log(self, step: int, values: dict, lr: float, meter, progress, done_at: float | None = None) -> None:
        """One log window, from values the device finished a step ago (no wait; the meter's clock then
        ends the window when its last step has finished, which is what makes img/s right on CUDA; on the
        CPU `done_at` is that time)."""
        state = self.state
        if values["window_count"] > 0:  # a window of skipped steps only keeps the last loss
            state.last_loss = values["loss"]
        metrics = {"train/loss": state.last_loss, "train/lr": lr, "train/grad_norm": values["grad_norm"],
                   "train/samples_seen": state.samples_seen - (state.step - step) * self.cfg.stage.global_batch,
                   "train/nonfinite_skipped": state.nonfinite_skipped, **meter.window(done_at)}
        for reason, count in self.loader.skip_counts().items():
            metrics[f"data/skipped/{reason}"] = count
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self.tracker.log(metrics, step=step)
        progress.log(step, loss=state.last_loss, lr=lr, img_per_s=metrics.get("throughput/img_per_s"))
        self._status("running")

    @contextlib.contextmanager
    def _ema_weights(self):
        """The UNet holds the EMA weights while inside; after, the raw weights again, bit for bit."""
        # named_trainable() inside weights_edited(): FSDP2 registers its unsharded tensors between a forward
        # pass and its reshard, and the edit must reach the shards.
        with self.engine.weights_edited():
            saved = self.ema.copy_to(self.engine.named_trainable())
        try:
            yield
        finally:
            with self.engine.weights_edited():
                self.ema.restore(self.engine.named_trainable(), saved)

    @contextlib.contextmanager
    def _weights_for_samples(self):
        """The UNet holds the weights a sample grid is drawn with (tracking.sample_weights) while inside.
        Yields their description."""
        step = self.state.step
        if self.cfg.tracking.sample_weights == "raw":
            yield f"raw weights at step {step}"
            return
        with self._ema_weights():
            yield f"EMA weights at step {step}"

    @contextlib.contextmanager
    def _evaluating(self):
        """The UNet in eval mode while inside (sample grids, validation), in train mode again after."""
        self.engine.unet.eval()
        try:
            yield
        finally:
            self.engine.unet.train()

    def _validate(self) -> dict[str, float]:
        """The validation loss of the raw weights and, with an EMA, of the average (every rank calls it)."""
        with self._evaluating():
            losses = {"val/loss": self.validator.loss(self.engine.module, self.engine.autocast())}
            if self.ema is not None:
                with self._ema_weights():
                    losses["val/loss_ema"] = self.validator.loss(self.engine.module, self.engine.autocast())
        self.tracker.log(losses, step=self.state.step)
        if self.env.is_main:
            shown = ", ".join(f"{k} {v:.5f}" for k, v in losses.items())
            print(f"step {self.state.step}: {shown} ({self.validator.samples} held-out samples)", flush=True)
        return losses

    @torch.no_grad()
    def _log_samples(self, steps: int = 20, scale: float = 3.0) -> None:
        """A grid from the fixed prompts (tools/sample.py: DDIM, classifier-free guidance with CLIP(""),
        seeds 0..n-1) with the EMA or the raw weights, in the training precision.

        Every rank runs it: under FSDP2 and ZeRO-3 the forward pass is collective."""
        from tools.sample import SamplingConfig, SamplingModels, decode, sample_latents

        prompts = list(self.cfg.tracking.sample_prompts)
        res = self.cfg.stage.data.resolution
        # precision "full": no fp16 autocast of its own; the engine's (bf16) applies around it.
        sampling = SamplingConfig(sampler="ddim", steps=steps, scale=scale, height=res, width=res, precision="full")
        with self._evaluating():
            with self._weights_for_samples() as weights:
                models = SamplingModels.of(self.engine.unet, self.frozen.vae, self.frozen.text_encoder,
                                           self.schedule, self.env.device, weights)
                with self.engine.autocast():
                    z = sample_latents(models, prompts, range(len(prompts)), sampling,
                                       unet_forward=self.engine.module)
            images = decode(models, z, sampling)
        self.tracker.log_images("samples", images.cpu(), prompts, self.state.step)


def start_checks(cfg: TrainConfig) -> None:
    """Before minutes of model building, on rank 0 (one rank lists the folders): the shards and frozen sources
    are there, and the run folder's lock, taken before anything is written there."""
    check_shards_exist(cfg)
    check_frozen_sources(cfg)
    hold_run_dir(Path(cfg.run.dir))


def run(cfg: TrainConfig, config_dict: dict) -> int:
    env = init_distributed(cfg.cluster.device, single_needs_group=cfg.backend == "fsdp")
    if cfg.checkpoint.export is not None:
        from train.export import export_checkpoint

        return export_checkpoint(cfg, env, config_dict)
    # From here a pre-emption signal is a flag: one rank dying of it during start-up while the others trained
    # ended the stage "failed" (so not requeued).
    flag = PreemptionFlag(announce=env.is_main)
    on_rank_zero(lambda: start_checks(cfg))
    trainer = Trainer(cfg, env, config_dict)
    try:
        code = trainer.train(flag)
    except (Exception, KeyboardInterrupt) as err:  # KeyboardInterrupt: a second Ctrl-C (train/signals.py)
        # Not left at "running" for `python -m launch status` and the chain; `error` says what ended it.
        # Rank 0 stopped for another rank's failure: the status names that one.
        error = f"{err.kind} on rank {err.rank}" if isinstance(err, StoppedByOtherRank) else type(err).__name__
        try:
            trainer._status("failed", error=error)
        except OSError as status_err:  # a full disk, say: what ended the run is raised below, not this
            print(f"warning: the run's failure is not in status.json ({status_err})", flush=True)
        raise
    finally:
        trainer.stop_loader()
    if env.is_main:
        (trainer.run_dir / "last_exit.json").write_text(json.dumps({"exit_code": code, "step": trainer.state.step}))
    return code
