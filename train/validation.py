"""The validation loss: the training objective on held-out samples, with the same draw every time.

Each held-out sample gets its timestep and noise from its id (data/held_out.py), not from the rank, the
world size or the step, and its latent is the VAE posterior's mean, so every pass measures the same
quantity on any number of GPUs and the curve moves only when the weights do (the training loss, a
fresh draw each step, is noisy). The value is the mean over samples of each sample's squared error,
the training loss's reduction. CompVis logged it as val/loss_simple and val/loss_simple_ema; here
val/loss and val/loss_ema.

The samples are encoded once, when the validator is built, and kept on the device: z and the text
context, 64 KiB + 77 x 768 x 4 bytes per sample at 512 px (~0.3 MiB), so keep the held-out set to a few
thousand samples per GPU at most.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.held_out import HeldOut
from train.step import FrozenParts, encode_batch


def draw_for(sample_id: str, latent_shape: tuple[int, ...], num_timesteps: int) -> tuple[int, torch.Tensor]:
    """The timestep and noise of one held-out sample, a function of its id alone."""
    seed = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little") >> 1  # a non-negative int64
    generator = torch.Generator().manual_seed(seed)
    t = int(torch.randint(0, num_timesteps, (1,), generator=generator))
    return t, torch.randn(latent_shape, generator=generator)


@dataclass
class _Batch:
    z: torch.Tensor
    context: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    weight: torch.Tensor  # 1 per real sample; 0 for padding (_padded, and the batches that keep ranks in step)


def _padded(batch: _Batch, size: int) -> _Batch:
    """Zero rows of weight 0 up to `size`: every pass has the training micro-batch's shape (one compiled
    graph, not one per short batch), and the rows do not count."""
    missing = size - len(batch.weight)
    if missing == 0:
        return batch
    return _Batch(*(torch.cat([t, t.new_zeros(missing, *t.shape[1:])]) for t in
                    (batch.z, batch.context, batch.timesteps, batch.noise, batch.weight)))


def _all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=op)
    return value


class Validator:
    def __init__(self, held_out: HeldOut, frozen: FrozenParts, schedule, device: torch.device, encode_autocast,
                 latent_shape: tuple[int, int, int], context_shape: tuple[int, int]):
        self.schedule = schedule
        self.batches: list[_Batch] = []
        samples = 0
        for batch in held_out:  # encoded as read: the images of one batch at a time in memory
            z, context = encode_batch(batch, frozen, device, None, encode_autocast, sample=False)
            draws = [draw_for(i, tuple(z.shape[1:]), schedule.num_timesteps) for i in batch["ids"]]
            samples += len(draws)
            self.batches.append(_padded(_Batch(z, context, torch.tensor([t for t, _ in draws], device=device),
                                               torch.stack([n for _, n in draws]).to(device),
                                               torch.ones(len(draws), device=device)), held_out.batch_size))
        counts = torch.tensor([len(self.batches), samples], device=device)
        most_batches = int(_all_reduce(counts[:1].clone(), dist.ReduceOp.MAX))
        self.samples = int(_all_reduce(counts[1:].clone()))
        self.skips = held_out.read_skips + _gathered_counter(held_out.decode_skips)
        if self.samples == 0:
            raise ValueError(f"the held-out shards give no usable sample (skipped: {dict(self.skips)})")
        # Under FSDP2 and ZeRO-3 a forward pass is collective: every rank runs as many as the busiest one.
        empty = _Batch(torch.zeros(0, *latent_shape, device=device), torch.zeros(0, *context_shape, device=device),
                       torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, *latent_shape, device=device),
                       torch.zeros(0, device=device))
        self.batches += [_padded(empty, held_out.batch_size)] * (most_batches - len(self.batches))

    @torch.no_grad()
    def loss(self, forward, autocast) -> float:
        """The mean squared error of `forward` (the UNet's forward pass, as the training step calls it) over
        every held-out sample of every rank. All ranks call it; it reads the result (a device sync)."""
        total = torch.zeros((), device=self.batches[0].z.device)
        for b in self.batches:
            x_t = self.schedule.q_sample(b.z, b.timesteps, b.noise)
            with autocast:
                prediction = forward(x_t, b.timesteps, b.context)
            per_sample = (prediction.float() - b.noise).square().flatten(1).mean(dim=1)
            total += (per_sample * b.weight).sum()
        return _all_reduce(total).item() / self.samples


def _gathered_counter(counts: Counter) -> Counter:
    if not dist.is_initialized():
        return Counter(counts)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, dict(counts))
    return sum((Counter(c) for c in every), Counter())
