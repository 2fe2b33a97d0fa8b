"""FSDP2: `fully_shard` each UNet block, then the root. bf16 (or fp16) parameters for compute with
fp32 (or, with parallel.reduce_dtype=bf16, bf16) gradient reduction; the sharded fp32 parameters stay
the optimiser's master copy."""
from __future__ import annotations

import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from . import dcp_io
from .base import DTYPES, compile_blocks, place_unet
from .torch_engine import TorchEngine


def parallelize_unet(unet, device_type: str, world_size: int, param_dtype: torch.dtype,
                     reshard_after_forward: bool, compile_backend: str | None,
                     reduce_dtype: torch.dtype = torch.float32):
    """Compile (with `compile_backend`, None: not) and shard the UNet block by block; returns the same
    module, sharded in place."""
    if compile_backend:
        compile_blocks(unet, compile_backend)
    mesh = init_device_mesh(device_type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in unet.blocks():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root keeps time_embed and the output head; it never reshards (its backward runs first).
    fully_shard(unet, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return unet


class FSDPEngine(TorchEngine):
    ema_layout = "dim0"  # fully_shard's Shard(0)

    def __init__(self, cfg, unet, env, accumulation: int, lr_offset: int = 0):
        super().__init__(cfg, env, accumulation)
        if not torch.distributed.is_initialized():
            raise RuntimeError("backend=fsdp needs torch.distributed: start with torchrun (python -m launch torchrun) "
                               "or use backend=ddp for a single process")
        place_unet(unet, cfg.parallel, env.device, nhwc_weights=False)  # fully_shard takes contiguous tensors only
        self.module = self.unet = parallelize_unet(unet, env.device.type, env.world_size, self.dtype,
                                                   cfg.parallel.reshard_after_forward,
                                                   cfg.parallel.compile_backend if cfg.parallel.compile else None,
                                                   DTYPES[cfg.parallel.reduce_dtype])
        self._setup_optimizer(lr_offset)

    def autocast(self):
        return contextlib.nullcontext()  # FSDP2 casts parameters and the root's inputs itself

    @contextlib.contextmanager
    def weights_edited(self):
        # A forward pass leaves the root (and, with reshard_after_forward=false, every block) unsharded, and
        # the next one would reuse those gathered weights instead of gathering the edited shards.
        for module in self.unet.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        yield

    def _make_scaler(self, enabled: bool):
        # Each rank holds a different gradient shard: the inf/nan check must be all-reduced, or one rank
        # would skip a step that another takes.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.env.device.type, enabled=enabled)

    def _gradient_sync(self, enabled):
        self.unet.set_requires_gradient_sync(enabled)  # reduce-scatter once per optimiser step
        return contextlib.nullcontext()

    def full_state_dict(self):
        return dcp_io.full_model_state(self.unet, self.env.is_main)

    def full_ema_state_dict(self, shadow):
        params = dict(self.unet.named_parameters())
        full = {}
        for name, local in shadow.items():
            p = params[name]
            t = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            full[name] = t.full_tensor().cpu()  # a collective: every rank runs it
        return full if self.env.is_main else None
