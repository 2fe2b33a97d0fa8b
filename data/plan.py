"""The deterministic reading plan behind exact resume.

Every rank runs `streams_per_rank` independent *streams*; stream `s` of rank `r` is global stream
`g = r * streams_per_rank + s` of `world_size * streams_per_rank`. For epoch `e`:
- the shard list is permuted with an RNG seeded by (seed, e) — the same on every rank, different
  every epoch — and global stream g takes positions g, g + G, g + 2G, ... of the permutation, so
  the streams of all ranks split the shards disjointly and completely;
- a stream reads its shards in groups of `shards_per_group`, interleaving the group's tars and
  passing the samples through a shuffle buffer, all driven by one RNG seeded by
  (seed, e, g, group index) and reset at the group's end.
So where a stream is is fully described by a Cursor (epoch, group, samples emitted from that group),
and a stream restarted from a cursor re-reads the group's tars up to that point without decoding
anything (only the tar bytes and the json are read) and continues exactly as before.
Streams are endless: after the last group of epoch e comes epoch e + 1.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    group: int = 0
    offset: int = 0  # samples emitted from this group before the position

    def to_list(self) -> list[int]:
        return [self.epoch, self.group, self.offset]

    @classmethod
    def from_list(cls, values: list[int]) -> "Cursor":
        epoch, group, offset = (int(v) for v in values)
        return cls(epoch, group, offset)


@dataclass(frozen=True)
class ShardPlan:
    num_shards: int
    seed: int
    world_size: int
    streams_per_rank: int
    shards_per_group: int

    def __post_init__(self) -> None:
        if self.num_shards < self.num_streams:
            raise ValueError(
                f"{self.num_shards} shards cannot feed {self.num_streams} streams (world_size={self.world_size} x "
                f"streams_per_rank={self.streams_per_rank}): every stream needs at least one shard per epoch. "
                "Write more, smaller shards, or lower num_workers / streams_per_rank.")

    @property
    def num_streams(self) -> int:
        return self.world_size * self.streams_per_rank

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_shards))
        random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        return order

    def stream_groups(self, epoch: int, global_stream: int) -> list[list[int]]:
        shards = self.epoch_order(epoch)[global_stream::self.num_streams]
        k = self.shards_per_group
        return [shards[i:i + k] for i in range(0, len(shards), k)]


def mix_and_shuffle(rng: random.Random, sources: list[Iterator[Any]], buffer_size: int) -> Iterator[Any]:
    """Interleaves the sources (the next item comes from a randomly chosen unfinished source) through
    a shuffle buffer of `buffer_size` items; deterministic given the rng and the sources' contents."""
    active = list(sources)
    buffer: list[Any] = []
    try:
        while active:
            i = rng.randrange(len(active))
            try:
                item = next(active[i])
            except StopIteration:
                active[i] = active[-1]
                active.pop()
                continue
            if len(buffer) < buffer_size:
                buffer.append(item)
                continue
            j = rng.randrange(buffer_size)
            buffer[j], item = item, buffer[j]
            yield item
        while buffer:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    finally:
        for source in active:  # close unfinished readers now (kills their pipe: commands)
            close = getattr(source, "close", None)
            if close is not None:
                close()


def stream_items(plan: ShardPlan, global_stream: int, start: Cursor, buffer_size: int,
                 read_shard: Callable[[int, int], Iterator[Any]],
                 at_start: Callable[[bool], None],
                 group_end: Callable[[list[int]], None]) -> Iterator[tuple[Cursor, Any]]:
    """Endless (cursor after the item, item) of one stream, from `start`. `read_shard(epoch, shard)`
    gives a shard's items; `at_start(True)` is called once the stream stands exactly at `start` (after
    the fast-forward), so that side effects of the replayed reads (skip counts) can be discarded;
    `at_start(False)` if the data changed and `start` no longer exists (the stream then goes on
    from the next group). `group_end(shards)` follows the last item of each group, once the consumer
    has handled it (and so can tell whether the group gave anything usable)."""
    epoch, group, skip = start.epoch, start.group, start.offset
    if skip == 0:
        at_start(True)
    while True:
        groups = plan.stream_groups(epoch, global_stream)
        while group < len(groups):
            rng = random.Random(f"mix/{plan.seed}/{epoch}/{global_stream}/{group}")
            items = mix_and_shuffle(rng, [read_shard(epoch, shard) for shard in groups[group]], buffer_size)
            emitted = 0
            for item in items:
                emitted += 1
                if emitted < skip:
                    continue
                if emitted == skip:
                    at_start(True)
                    continue
                yield Cursor(epoch, group, emitted), item
            if emitted < skip:
                # The group gave fewer samples than when the state was saved (a shard that was
                # readable then is not now): go on from the next group rather than stop training.
                at_start(False)
            group_end(groups[group])
            skip = 0
            group += 1
        epoch, group = epoch + 1, 0
