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

A run resumed on another number of streams (another world size) cannot map the old streams onto the
new ones, since the split of every epoch depends on the stream count. The new streams begin their own
plan at the epoch after the furthest any old stream had begun, and `replan` hands out what the old
streams had not read of the epochs before it (the rest of their current epoch; a stream that lagged an
epoch behind, its share of the next one too): every unread or partly read group, as `Carried` (the old
plan's stream count, epoch, stream and group, and how far it was read), dealt round-robin to the new
streams. A new stream reads its carried groups first, each exactly as the old stream would have (same
shards, same shuffle, same per-sample randomness, the read part skipped), then its own plan. So every
sample of an interrupted epoch is still seen once, whatever the world size does. A Cursor with carried
groups describes such a stream.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class Carried:
    """One group of another plan, to be read before the stream's own: the group `group` of stream `stream`
    in `epoch` of a plan with `num_streams` streams, of which the first `offset` samples were read."""
    num_streams: int
    epoch: int
    stream: int
    group: int
    offset: int = 0

    def to_list(self) -> list[int]:
        return [self.num_streams, self.epoch, self.stream, self.group, self.offset]


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    group: int = 0
    offset: int = 0  # samples emitted from this group before the position
    # Groups of another plan still to read, the first one under way; the own plan starts at
    # (epoch, group, offset) once they are done.
    carried: tuple[Carried, ...] = ()

    @property
    def item_epoch(self) -> int:
        """The epoch of the sample just read (its per-sample randomness is seeded with it)."""
        return self.carried[0].epoch if self.carried else self.epoch

    def to_list(self) -> list:
        own = [self.epoch, self.group, self.offset]
        return own + [[c.to_list() for c in self.carried]] if self.carried else own

    @classmethod
    def from_list(cls, values: list) -> "Cursor":
        epoch, group, offset = (int(v) for v in values[:3])
        carried = tuple(Carried(*(int(v) for v in c)) for c in values[3]) if len(values) > 3 else ()
        return cls(epoch, group, offset, carried)


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
        return list(_epoch_order(self.num_shards, self.seed, epoch))

    def stream_groups(self, epoch: int, global_stream: int, num_streams: int | None = None) -> list[list[int]]:
        """The groups of `global_stream` in `epoch`; `num_streams` reads them for a plan of another stream
        count (carried groups), with the same shards, seed and group size."""
        shards = _epoch_order(self.num_shards, self.seed, epoch)[global_stream::num_streams or self.num_streams]
        k = self.shards_per_group
        return [list(shards[i:i + k]) for i in range(0, len(shards), k)]


@lru_cache(maxsize=4)
def _epoch_order(num_shards: int, seed: int, epoch: int) -> tuple[int, ...]:
    # Cached: a shuffle of LAION-2B's ~230k shards takes ~0.1 s, and a replan (or a stream reading carried
    # groups) asks for the same epoch once per stream or group.
    order = list(range(num_shards))
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return tuple(order)


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
                 replay: Callable[[str], None],
                 group_end: Callable[[list[int]], None]) -> Iterator[tuple[Cursor, Any]]:
    """Endless (cursor after the item, item) of one stream, from `start`: its carried groups, then its own
    plan. `read_shard(epoch, shard)` gives a shard's items. Where a group was partly read before, its
    first items are read again without being yielded, between `replay("begin")` and `replay("exact")`, so
    that side effects of those reads (skip counts) can be discarded; `replay("short")` instead if the group
    gives fewer items than before (the data changed: the stream goes on with the next group).
    `group_end(shards)` follows the last item of each group, once the consumer has handled it (and so can
    tell whether the group gave anything usable)."""
    for i, carried in enumerate(start.carried):
        rest = start.carried[i + 1:]

        def after(emitted: int, carried=carried, rest=rest) -> Cursor:
            return replace(start, carried=(replace(carried, offset=emitted), *rest))

        shards = plan.stream_groups(carried.epoch, carried.stream, carried.num_streams)[carried.group]
        yield from _group_items(plan, carried.epoch, carried.stream, carried.group, shards, carried.offset,
                                buffer_size, read_shard, replay, after)
        group_end(shards)
    epoch, group, skip = start.epoch, start.group, start.offset
    while True:
        groups = plan.stream_groups(epoch, global_stream)
        while group < len(groups):
            yield from _group_items(plan, epoch, global_stream, group, groups[group], skip, buffer_size, read_shard,
                                    replay, lambda emitted, e=epoch, g=group: Cursor(e, g, emitted))
            group_end(groups[group])
            skip = 0
            group += 1
        epoch, group = epoch + 1, 0


def _group_items(plan: ShardPlan, epoch: int, stream: int, group: int, shards: list[int], skip: int,
                 buffer_size: int, read_shard, replay, cursor_after) -> Iterator[tuple[Cursor, Any]]:
    """One group's items in its shuffled order, the first `skip` read again but not yielded."""
    rng = random.Random(f"mix/{plan.seed}/{epoch}/{stream}/{group}")
    items = mix_and_shuffle(rng, [read_shard(epoch, shard) for shard in shards], buffer_size)
    if skip:
        replay("begin")
    emitted = 0
    for item in items:
        emitted += 1
        if emitted < skip:
            continue
        if emitted == skip:
            replay("exact")
            continue
        yield cursor_after(emitted), item
    if emitted < skip:
        # The group gave fewer samples than when the state was saved (a shard that was
        # readable then is not now): go on from the next group rather than stop training.
        replay("short")


def replan(old: ShardPlan, cursors: list[Cursor], new: ShardPlan) -> list[Cursor]:
    """Start cursors for every stream of `new` (by global stream) that go on from `cursors`, the positions
    of every stream of `old`. The new streams begin their own plan at the epoch after the furthest any old
    stream had begun; whatever the old streams had not read of the epochs before it (the rest of their
    current one, whole epochs for a stream that lagged behind, the groups they had themselves carried) is
    dealt round-robin to the new streams, which read it first. The same stream count keeps every stream
    as it was: each goes on with the samples it would have read next."""
    if len(cursors) != old.num_streams:
        raise ValueError(f"{len(cursors)} cursors for a plan of {old.num_streams} streams")
    if (old.num_shards, old.seed, old.shards_per_group) != (new.num_shards, new.seed, new.shards_per_group):
        raise ValueError("replan keeps the shards, the seed and the group size; only the stream count may change")
    if new.num_streams == old.num_streams:
        return list(cursors)
    # An old stream has begun the epoch of its own position, unless it is still reading carried groups.
    next_epoch = max(c.epoch + (0 if c.carried else 1) for c in cursors)
    left: list[Carried] = []
    for stream, cursor in enumerate(cursors):
        left.extend(cursor.carried)
        epoch, first, offset = cursor.epoch, cursor.group, cursor.offset
        while epoch < next_epoch:
            groups = old.stream_groups(epoch, stream)
            left.extend(Carried(old.num_streams, epoch, stream, g, offset if g == first else 0)
                        for g in range(first, len(groups)))
            epoch, first, offset = epoch + 1, 0, 0
    # Interleave the old streams (group k of every stream before group k + 1) so that each new stream
    # gets a mix of them, and read partly read groups first.
    left.sort(key=lambda c: (c.offset == 0, c.epoch, c.group, c.num_streams, c.stream))
    return [Cursor(next_epoch, 0, 0, tuple(left[s::new.num_streams])) for s in range(new.num_streams)]
