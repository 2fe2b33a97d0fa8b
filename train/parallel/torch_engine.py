"""What DDP and FSDP2 share: torch's AdamW and GradScaler on the wrapped module's parameters, and
model + optimiser + LR schedule through torch.distributed.checkpoint."""
from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import torch

from train.lr import build_scheduler

from . import dcp_io
from .base import Engine, build_optimizer


class TorchEngine(Engine):
    def _setup_optimizer(self, lr_offset: int) -> None:
        self.optimizer = build_optimizer(self.unet.parameters(), self.cfg.optim, fused=True)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim.warmup_steps, self.cfg.optim.warmup_start,
                                         lr_offset)
        # Loss scaling only for fp16; bf16 and fp32 need none.
        self.scaler = self._make_scaler(enabled=self.dtype == torch.float16)

    def _make_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        """Every rank sees the same full gradients after DDP's all-reduce, so a local inf check agrees."""
        return torch.amp.GradScaler(self.env.device.type, enabled=enabled)

    @abstractmethod
    def _gradient_sync(self, enabled: bool):
        """A context in which backward reduces gradients across ranks only when `enabled`."""

    def backward(self, loss, last_micro_batch):
        with self._gradient_sync(last_micro_batch):
            self.scaler.scale(loss / self.accumulation).backward()

    def step(self, skip):
        self.scaler.unscale_(self.optimizer)  # fp16: unscaled gradients, and the scaler's own overflow check
        norm = self.clip(self.unet.parameters())
        # The norm is the same on every rank (taken after the gradient reduction), so this stays collective.
        skipped = torch.maximum(skip.float(), (~torch.isfinite(norm)).float())
        self.optimizer.found_inf = skipped  # read by the fused AdamW kernel: a device-side skip
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.scaler.update()  # fp16: halves the scale after an overflow, grows it after enough clean steps
        self.scheduler.step()  # the LR follows the step count, skipped steps included
        self.optimizer.zero_grad(set_to_none=True)
        return norm, skipped

    def named_trainable(self):
        return dict(self.unet.named_parameters())

    def save(self, path: Path):
        # The loss scale and its growth counter are part of the optimisation state: without them an fp16
        # run would restart at 2^16 and skip steps on resume that the uninterrupted run did not.
        dcp_io.save(path, self.unet, self.optimizer, self.scheduler, {"grad_scaler": self.scaler.state_dict()})

    def load(self, path: Path):
        extra = {"grad_scaler": self.scaler.state_dict()}
        dcp_io.load(path, self.unet, self.optimizer, self.scheduler, extra)
        self.scaler.load_state_dict(extra["grad_scaler"])
