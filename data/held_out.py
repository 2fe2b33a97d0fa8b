"""Held-out shards, read whole and in order: the validation set of a stage.

Unlike the training loader (endless, shuffled, resumable), a validation pass must see every usable
sample exactly once, the same ones each time, split across ranks whatever their number: every rank
reads the shards in order and decodes the samples whose position in that order is its rank modulo the
world size (one shard is enough for any number of ranks). Captions are never dropped and images are
centre-cropped.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .loader import _tokenizer, collate, expand_shards
from .samples import Decoder, read_candidates
from .stages import SubsetFilter


@dataclass
class HeldOut:
    batches: list[dict]  # this rank's samples, collated (the last batch may be short); each has "ids"
    read_skips: Counter  # samples the shards hold but no rank uses, by reason (the same on every rank)
    decode_skips: Counter  # this rank's samples that could not be decoded, by reason


def read_held_out(shards: str | tuple[str, ...], rank: int, world_size: int, batch_size: int, resolution: int,
                  latents: bool = False, context: bool = False, filters: SubsetFilter | None = None) -> HeldOut:
    """This rank's share of the held-out shards' samples, decoded and batched. A sample's id is
    "<shard file name>/<key>": the same wherever the shards are copied to."""
    decoder = Decoder(seed=0, resolution=resolution, crop="center", caption_dropout=0.0, latents=latents,
                      context=context)
    read_skips: Counter = Counter()
    decode_skips: Counter = Counter()
    mine, position = [], 0
    for shard, url in enumerate(expand_shards(shards)):
        for candidate in read_candidates(url, shard, filters, latents, context, read_skips,
                                         latent_size=resolution // 8):
            position += 1
            if (position - 1) % world_size != rank:
                continue
            sample = decoder(0, candidate, decode_skips)
            if sample is not None:
                sample["id"] = f"{url.rsplit('/', 1)[-1]}/{candidate.key}"
                mine.append(sample)
    batches = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        batch = collate(chunk, latents, context, _tokenizer())
        batch["ids"] = [s["id"] for s in chunk]
        batches.append(batch)
    return HeldOut(batches, read_skips, decode_skips)
