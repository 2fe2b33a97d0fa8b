"""DistributedDataParallel: a full replica per rank, gradients all-reduced on the last micro-batch."""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from .base import compile_blocks, place_unet
from .torch_engine import TorchEngine


class DDPEngine(TorchEngine):
    def __init__(self, cfg, unet, env, accumulation: int, lr_offset: int = 0):
        super().__init__(cfg, env, accumulation)
        place_unet(unet, cfg.parallel, env.device)
        if cfg.parallel.compile:
            compile_blocks(unet, cfg.parallel.compile_backend)
        self.unet = unet
        distributed = torch.distributed.is_initialized()
        # Gradients as views of DDP's all-reduce buckets: no second copy of the 3.4 GB of fp32 gradients,
        # and no copy into and out of the buckets around each all-reduce.
        self.module = (DistributedDataParallel(unet, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                               gradient_as_bucket_view=True)
                       if distributed else unet)
        if distributed and cfg.parallel.reduce_dtype == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            self.module.register_comm_hook(None, bf16_compress_hook)  # each bucket all-reduced in bf16
        self._setup_optimizer(lr_offset)

    def _gradient_sync(self, enabled):
        no_sync = getattr(self.module, "no_sync", None)
        return no_sync() if (no_sync and not enabled) else contextlib.nullcontext()

    def full_state_dict(self):
        return {k: v.detach().float().cpu().clone() for k, v in self.unet.state_dict().items()} \
            if self.env.is_main else None

    def full_ema_state_dict(self, shadow):
        return {k: v.detach().cpu().clone() for k, v in shadow.items()} if self.env.is_main else None
