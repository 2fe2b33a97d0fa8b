"""Held-out shards, read whole and in order: the validation set of a stage.

Unlike the training loader (endless, shuffled, resumable), a validation pass must see every usable
sample exactly once, the same ones each time, split across ranks whatever their number: every rank
reads the shards in order and decodes the samples whose position in that order is its rank modulo the
world size (one shard is enough for any number of ranks). Captions are never dropped and images are
centre-cropped.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from .loader import _tokenizer, collate, expand_shards
from .samples import Decoder, read_candidates
from .stages import SubsetFilter


class HeldOut:
    """This rank's share of the held-out shards as collated batches (the last one may be short), read
    as they are iterated, so a caller that encodes them never holds more than one batch of images. Each
    batch has "ids": "<shard file name>/<key>", the same wherever the shards are copied to."""

    def __init__(self, shards: str | tuple[str, ...], rank: int, world_size: int, batch_size: int, resolution: int,
                 latents: bool = False, context: bool = False, filters: SubsetFilter | None = None):
        self.urls = expand_shards(shards)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.latents, self.context, self.filters, self.resolution = latents, context, filters, resolution
        self.read_skips: Counter = Counter()  # samples the shards hold but no rank uses (the same on every rank)
        self.decode_skips: Counter = Counter()  # this rank's samples that could not be decoded

    def __iter__(self) -> Iterator[dict]:
        self.read_skips.clear()
        self.decode_skips.clear()
        decoder = Decoder(seed=0, resolution=self.resolution, crop="center", caption_dropout=0.0,
                          latents=self.latents, context=self.context)
        chunk, position = [], 0
        for shard, url in enumerate(self.urls):
            for candidate in read_candidates(url, shard, self.filters, self.latents, self.context, self.read_skips,
                                             latent_size=self.resolution // 8, setting="stage.data.val_shards"):
                position += 1
                if (position - 1) % self.world_size != self.rank:
                    continue
                sample = decoder(0, candidate, self.decode_skips)
                if sample is None:
                    continue
                sample["id"] = f"{url.rsplit('/', 1)[-1]}/{candidate.key}"
                chunk.append(sample)
                if len(chunk) == self.batch_size:
                    yield self._collate(chunk)
                    chunk = []
        if chunk:
            yield self._collate(chunk)

    def _collate(self, samples: list[dict]) -> dict:
        batch = collate(samples, self.latents, self.context, _tokenizer())
        batch["ids"] = [s["id"] for s in samples]
        return batch
