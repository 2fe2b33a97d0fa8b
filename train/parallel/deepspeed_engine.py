"""DeepSpeed ZeRO 1/2/3 with a DeepSpeed config generated from ours.

Only the UNet goes to DeepSpeed; the frozen VAE and text encoder stay plain replicated modules, so
ZeRO-3 never partitions them (it would gather them layer by layer at every step for nothing).
The optimiser is torch's AdamW passed as a client optimiser (DeepSpeed's own "AdamW" type compiles
FusedAdam, ~100 s, and differs numerically from torch's).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from train.distributed import barrier
from train.lr import build_scheduler

from .base import Engine, build_optimizer, compile_blocks, place_unet

TAG = "ds"


def _import_deepspeed():
    """Import DeepSpeed without its shared-memory all-reduce op, which JIT-compiles C++ (~60 s) on first use
    on CPU and serves inference only."""
    import deepspeed.comm.torch  # noqa: F401 - binds the module in sys.modules

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed

    return deepspeed


def _to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's offline conversion, written to a temporary folder and renamed when complete."""
    import argparse
    import shutil

    _import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # inject_missing_state: our checkpoints carry no Megatron-style UNIVERSAL_CHECKPOINT_INFO (no tensor or
    # pipeline parallelism to describe); the conversion then assumes none.
    # One worker each: more would fork worker processes out of a rank that holds CUDA and NCCL state. The
    # price is small: at 100M parameters (ZeRO-2, fp32 Adam state) 22 s with one, 15.6 s with two, on a
    # 2-core CPU box; 56 s at 300M, so about 2.5 minutes for the SD UNet, once per resize.
    ds_to_universal.main(argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=1,
                                            num_merge_workers=1, keep_temp_folder=False, strict=True,
                                            inject_missing_state=True))
    os.replace(tmp, dst)


def deepspeed_config(cfg, world_size: int, accumulation: int) -> dict:
    stage = cfg.parallel.zero_stage
    precision = cfg.parallel.precision
    return {
        "train_batch_size": cfg.stage.global_batch,
        "train_micro_batch_size_per_gpu": cfg.stage.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "zero_optimization": {"stage": stage, "overlap_comm": stage > 0, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Explicit: DeepSpeed's default reduces in the parameters' dtype (bf16 under bf16), DDP and FSDP2 here in fp32.
        "communication_data_type": cfg.parallel.reduce_dtype,
        # And it sums the micro-batches' gradients in that dtype too: under bf16 (fp16) each of the accumulation
        # steps would round the running sum to 8 (11) bits, where DDP and FSDP2 sum in fp32. ZeRO-2 and 3, and
        # ZeRO-1 under fp16, keep an fp32 accumulator then; ZeRO-1 under bf16 switches to DeepSpeed's
        # BF16_Optimizer (fp32 gradients, ZeRO-1 states).
        **({"data_types": {"grad_accum_dtype": "fp32"}} if precision in ("bf16", "fp16") else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    def __init__(self, cfg, unet, env, accumulation: int, lr_offset: int = 0):
        super().__init__(cfg, env, accumulation)
        deepspeed = _import_deepspeed()
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo")
        place_unet(unet, cfg.parallel, env.device, nhwc_weights=False)  # it views parameters as flat bytes
        if cfg.parallel.compile:
            compile_blocks(unet, cfg.parallel.compile_backend)
        optimizer = build_optimizer(unet.parameters(), cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, cfg.optim.warmup_start, lr_offset)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=unet, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, env.world_size, accumulation))
        self.unet = unet
        self.module = self._forward_with_cast
        self.zero3 = cfg.parallel.zero_stage == 3
        self.ema_layout = "flat" if self.zero3 else "replicated"  # the EMA is shaped like the partitions

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed holds bf16/fp16 parameters itself; inputs are cast below

    def _forward_with_cast(self, x, timesteps, context):
        # DeepSpeed's bf16/fp16 modes hold low-precision parameters but do not cast the inputs.
        return self.ds(x.to(self.dtype), timesteps, context.to(self.dtype))

    def backward(self, loss, last_micro_batch):
        # DeepSpeed divides by the accumulation steps itself and reduces on its boundary. step() must run
        # after every micro-batch (it only steps the optimiser on the boundary), so the non-final ones do it here.
        self.ds.backward(loss)
        if not last_micro_batch:
            self.ds.step()

    def step(self, skip):
        # DeepSpeed's step reads the device itself (overflow checks, norms), so reading the vote here costs
        # nothing extra; its engine has no device-side skip to hand the vote to.
        if skip.item():
            # Drop the accumulated gradients and count the micro-step DeepSpeed would have counted, so its
            # accumulation boundaries stay aligned with ours.
            self.ds.zero_grad()
            self.ds.micro_steps += 1
            self.scheduler.step()  # as the torch engines: the LR follows the step count
            return torch.full((), float("nan"), device=skip.device), torch.ones((), device=skip.device)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = torch.as_tensor(0.0 if norm is None else float(norm), device=skip.device)
        if not self.ds.was_step_applied():
            # DeepSpeed found a non-finite gradient (of a finite loss) and dropped the update itself, without
            # stepping the LR schedule: report the skip (the EMA and the non-finite counters read it) and
            # keep the LR on the step count, as the torch engines do.
            self.scheduler.step()
            return norm, torch.ones((), device=skip.device)
        return norm, torch.zeros((), device=skip.device)

    def named_trainable(self):
        # The EMA follows DeepSpeed's working copy (bf16 under bf16; the fp32 master lives in the optimiser's
        # partitions): exact in fp32, within bf16 rounding of the master otherwise.
        if self.zero3:
            return {n: p.ds_tensor for n, p in self.unet.named_parameters()}  # this rank's flat partition
        return dict(self.unet.named_parameters())

    def local_pieces(self, full):
        if not self.zero3:
            return super().local_pieces(full)
        # ZeRO-3: this rank's slice of the flattened tensor, as its ds_tensor holds it (the last partitions
        # padded to equal size; the padding is never read back, see _gather_partitions).
        out = {}
        for name, p in self.unet.named_parameters():
            size = p.ds_tensor.numel()
            flat = full[name].reshape(-1)[self.env.rank * size:(self.env.rank + 1) * size]
            piece = torch.zeros(size, dtype=torch.float32, device=p.ds_tensor.device)
            piece[:flat.numel()] = flat
            out[name] = piece
        return out

    @contextlib.contextmanager
    def weights_edited(self):
        if not self.zero3:
            yield  # ZeRO-1/2: the forward reads the module's parameters themselves
            return
        # ZeRO-3 keeps parameters gathered between forward passes (the persistent small ones always, others
        # up to its reuse distance): release them all before the edit of the partitions and gather the
        # persistent ones again after it, as DeepSpeed does around loading a checkpoint.
        self.ds.optimizer.checkpoint_event_prologue()
        try:
            yield
        finally:
            self.ds.optimizer.checkpoint_event_epilogue()

    def save(self, path: Path):
        self.ds.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def load(self, path: Path, tag: str = TAG):
        load_path, _ = self.ds.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{tag}")

    def load_resharded(self, path: Path):
        """The files hold one ZeRO partition per rank of the run that wrote them: rank 0 converts them once
        into DeepSpeed's universal checkpoint (one folder of full fp32 tensors and Adam moments per
        parameter, kept beside the original: ds_to_universal), which every rank then cuts its own
        partitions from."""
        universal = path / f"{TAG}-universal"
        if self.env.is_main and not universal.is_dir():
            _to_universal(path / TAG, universal)
        barrier()
        self.ds._config.load_universal_checkpoint = True
        try:
            self.load(path, tag=universal.name)
        finally:
            self.ds._config.load_universal_checkpoint = False

    def kind(self) -> str:
        return f"{type(self).__name__}(ZeRO-{self.cfg.parallel.zero_stage})"

    def full_shapes(self):
        if not self.zero3:
            return super().full_shapes()
        return {name: p.ds_shape for name, p in self.unet.named_parameters()}

    def full_state_dict(self):
        """The fp32 master weights (not the bf16 working copy), gathered from their ZeRO partitions."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = {}
        for name, p in self.unet.named_parameters():
            value = safe_get_full_fp32_param(p)  # collective under ZeRO: every rank calls it
            full[name] = value.detach().float().cpu().clone()
        return full if self.env.is_main else None

    def full_ema_state_dict(self, shadow):
        if self.zero3:
            return self._gather_partitions(shadow)
        return {k: v.detach().cpu().clone() for k, v in shadow.items()} if self.env.is_main else None

    def _gather_partitions(self, local: dict[str, torch.Tensor]):
        """ZeRO-3 partitions are flat, padded 1-D chunks: gather them in rank order, trim, reshape."""
        params = dict(self.unet.named_parameters())
        full = {}
        for name, part in local.items():
            p = params[name]
            pieces = [torch.empty_like(part) for _ in range(self.env.world_size)]
            dist.all_gather(pieces, part.contiguous())
            full[name] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).float().cpu()
        return full if self.env.is_main else None
