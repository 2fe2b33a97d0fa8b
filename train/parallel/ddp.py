"""DistributedDataParallel: a full replica per rank, gradients all-reduced on the last micro-batch."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from train.lr import build_scheduler

from . import dcp_io
from .base import Engine, build_optimizer, compile_blocks


class DDPEngine(Engine):
    def __init__(self, cfg, unet, env, accumulation: int, lr_offset: int = 0):
        super().__init__(cfg, env, accumulation)
        unet.to(env.device)
        if cfg.parallel.compile:
            compile_blocks(unet)
        self.unet = unet
        distributed = torch.distributed.is_initialized()
        self.module = (DistributedDataParallel(unet, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
                       if distributed else unet)
        self.optimizer = build_optimizer(unet.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim.warmup_steps, cfg.optim.warmup_start, lr_offset)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.dtype == torch.float16)

    def backward(self, loss, last_micro_batch):
        no_sync = getattr(self.module, "no_sync", None)
        ctx = no_sync() if (no_sync and not last_micro_batch) else contextlib.nullcontext()
        with ctx:
            self.scaler.scale(loss / self.accumulation).backward()

    def step(self):
        self.scaler.unscale_(self.optimizer)
        norm = self.clip(self.unet.parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self):
        self.optimizer.zero_grad(set_to_none=True)

    def named_trainable(self):
        return dict(self.unet.named_parameters())

    def save(self, path: Path):
        dcp_io.save(path, self.unet, self.optimizer, self.scheduler)

    def load(self, path: Path):
        dcp_io.load(path, self.unet, self.optimizer, self.scheduler)

    def full_state_dict(self):
        return {k: v.detach().float().cpu().clone() for k, v in self.unet.state_dict().items()} \
            if self.env.is_main else None

    def full_ema_state_dict(self, shadow):
        return {k: v.detach().cpu().clone() for k, v in shadow.items()} if self.env.is_main else None
