"""What every backend provides to the training loop."""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_optimizer(params, optim_cfg, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with SD v1's settings (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.01).

    `fused`: one kernel per parameter group and, what the loop needs, `found_inf` support: the update
    is skipped on the device (parameters, moments and step count untouched) without a host decision."""
    return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                             eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, fused=fused or None)


def place_unet(unet: nn.Module, parallel_cfg, device: torch.device, nhwc_weights: bool = True) -> nn.Module:
    """On the device and in the configured memory format, before compile and wrapping (both must see
    the final layout: compiled graphs specialise on strides). `nhwc_weights=False` keeps the weights
    contiguous (FSDP2, DeepSpeed) while the activations still run NHWC."""
    unet.to(device)
    if parallel_cfg.channels_last:
        unet.use_channels_last(weights=nhwc_weights)
    return unet


def compile_in_place(modules, backend: str = "inductor", mode: str | None = None) -> None:
    """torch.compile each module in place: parameter names keep no `_orig_mod.` prefix. Modules of one
    class share one forward code object, so each distinct shape is one more cache entry: raise dynamo's
    limit, and keep shapes static. `mode`: inductor's ("reduce-overhead" adds CUDA graphs)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for module in modules:
        module.compile(dynamic=False, backend=backend, **({"mode": mode} if mode else {}))


def compile_blocks(unet: nn.Module, backend: str = "inductor", mode: str | None = None) -> None:
    """Each UNet block compiled in place, so FSDP2 can shard block by block around the compiled regions."""
    compile_in_place(unet.blocks(), backend, mode)


class Engine(ABC):
    module: nn.Module  # call this for the forward pass
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    # How named_trainable() cuts each tensor across the ranks, and so how a checkpoint's EMA pieces go
    # back together: "replicated" (every rank holds it whole), "dim0" (rank r holds the r-th torch.chunk
    # along dim 0) or "flat" (rank r holds the r-th equal slice of the flattened tensor, the last padded).
    ema_layout = "replicated"

    def __init__(self, cfg, env, accumulation: int):
        self.cfg, self.env, self.accumulation = cfg, env, accumulation
        self.dtype = DTYPES[cfg.parallel.precision]

    def autocast(self):
        """Mixed precision for the forward pass (backends that cast parameters themselves disable it)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    @abstractmethod
    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Accumulate gradients; the gradient all-reduce happens only on the last micro-batch."""

    @abstractmethod
    def step(self, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip (if configured), optimiser step, LR step, zero the gradients. `skip` (0/1 on the device,
        equal on every rank) drops the update; so does a non-finite gradient norm. Returns the grad norm
        and whether the update was skipped, both as device tensors: nothing here waits for the device."""

    @abstractmethod
    def named_trainable(self) -> dict[str, torch.Tensor]:
        """This rank's trainable tensors (full or local shards) with the UNet's parameter names."""

    def local_pieces(self, full) -> dict[str, torch.Tensor]:
        """Full tensors (a mapping by parameter name: an export's EMA, one put together from a checkpoint)
        cut into what this rank holds of each, shaped like `named_trainable()`, in fp32."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        out = {}
        for name, p in self.named_trainable().items():
            value = full[name].to(p.device, torch.float32)
            if isinstance(p, DTensor):
                # src_data_rank=None: every rank already has the full tensor, so no communication.
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()
            out[name] = value
        return out

    @contextlib.contextmanager
    def weights_edited(self):
        """Around an edit of `named_trainable()` in place, outside the optimiser (the EMA put in for a
        sample grid and taken out again): backends that keep gathered copies of the weights between
        forward passes drop them here, so the next forward reads the edit."""
        yield

    @abstractmethod
    def save(self, path: Path) -> None:
        """Model + optimiser + LR schedule, sharded, into the folder `path` (all ranks call this)."""

    @abstractmethod
    def load(self, path: Path) -> None: ...

    def kind(self) -> str:
        """What wrote a checkpoint, as far as reading it back goes (saved in its meta.json)."""
        return type(self).__name__

    def load_resharded(self, path: Path) -> None:
        """`load` of a checkpoint written by another number of ranks (all ranks call this). DCP reshards on
        its own; backends whose files are one partition per rank convert them first."""
        self.load(path)

    def full_shapes(self) -> dict[str, torch.Size]:
        """The full shape of each tensor of `named_trainable()` (whatever this rank holds of it)."""
        return {name: p.shape for name, p in self.named_trainable().items()}  # a DTensor's is the global one

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The consolidated UNet weights in fp32 on rank 0 (None elsewhere); all ranks call this."""

    @abstractmethod
    def full_ema_state_dict(self, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Consolidate EMA tensors shaped like `named_trainable()` into full tensors on rank 0."""

    def apply_optim_config(self) -> list[str]:
        """After a resume: the configured optimiser settings (optim.lr, beta1/beta2, eps, weight_decay) over
        the ones the checkpoint brought back (an optimiser's state dict restores its groups' hyper-parameters,
        the LR schedule's its base LRs), so that lowering the LR and resuming does what it says. The moments
        and the schedule's step stay as saved. Returns what was replaced, "setting: saved -> configured"."""
        o = self.cfg.optim
        scheduler = self.scheduler
        groups = scheduler.optimizer.param_groups  # the torch optimiser's (DeepSpeed's wrappers read these)
        configured = {"optim.beta1/beta2": ("betas", (o.beta1, o.beta2)), "optim.eps": ("eps", o.eps),
                      "optim.weight_decay": ("weight_decay", o.weight_decay)}
        changes = {}
        if list(scheduler.base_lrs) != [o.lr] * len(groups):
            changes["optim.lr"] = f"{scheduler.base_lrs[0]} -> {o.lr}"
        for group in groups:
            for setting, (key, value) in configured.items():
                saved = tuple(group[key]) if key == "betas" else group[key]
                if saved != value:
                    changes[setting] = f"{saved} -> {value}"
                group[key] = value
            group["initial_lr"] = o.lr
        scheduler.base_lrs = [o.lr] * len(groups)
        # The current LR: the configured one times the schedule's multiplier at the step it resumed at.
        lrs = [o.lr * multiplier(scheduler.last_epoch) for multiplier in scheduler.lr_lambdas]
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
        return [f"{setting}: {change}" for setting, change in changes.items()]

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def clip(self, params) -> torch.Tensor:
        max_norm = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
