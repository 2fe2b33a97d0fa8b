"""Resuming the data on another world size (data.plan.replan, ShardLoader.load_state_dicts): every sample
of an interrupted epoch is read once, none skipped or repeated, each carried group exactly as the old
stream would have read it; checked against straight runs of the old plan."""
import json
import random

import pytest

from data.loader import ShardLoader
from data.plan import Cursor, ShardPlan, replan, stream_items
from test_data_loader import NUM_SHARDS, PER_SHARD, all_keys, assert_same_batches, config, keys_of, shards, take  # noqa: F401

SIZES = [5, 9, 3, 7, 6, 8, 4, 10, 2, 6, 7, 5, 9]  # samples per shard: uneven, as real shards are


def read_shard(epoch, shard):
    return iter([(shard, i) for i in range(SIZES[shard])])


def items(plan, stream, start):
    """(cursor, item) of one stream, endless."""
    return stream_items(plan, stream, start, 4, read_shard, lambda event: None, lambda shards: None)


def run_streams(plan, counts, starts=None):
    """Reads counts[g] items from every stream g; returns (cursors after, items read by stream)."""
    cursors, read = [], []
    for g, n in enumerate(counts):
        start = starts[g] if starts else Cursor()
        cursor, got = start, []
        it = items(plan, g, start)
        for _ in range(n):
            cursor, item = next(it)
            got.append((cursor, item))
        cursors.append(cursor)
        read.append(got)
    return cursors, read


def carried_part(plan, stream, start):
    """What a replanned stream reads before its own plan begins, and its first own cursor."""
    out = []
    for cursor, item in items(plan, stream, start):
        if not cursor.carried:
            return out, cursor
        out.append((cursor, item))


def plan(streams, world=1):
    return ShardPlan(len(SIZES), seed=7, world_size=world, streams_per_rank=streams // world, shards_per_group=2)


def epoch_items(p, epoch):
    return sorted((s, i) for s in range(p.num_shards) for i in range(SIZES[s]))


@pytest.mark.parametrize("new_streams", [1, 3, 5, 8])
def test_every_sample_of_the_interrupted_epoch_is_read_once(new_streams):
    old = plan(4)
    rng = random.Random(new_streams)
    cursors, before = run_streams(old, [rng.randrange(1, 12) for _ in range(4)])
    new = plan(new_streams)
    starts = replan(old, cursors, new)
    after, own_starts = zip(*(carried_part(new, h, starts[h]) for h in range(new_streams)))
    seen = [item for got in before + list(after) for _, item in got]
    assert sorted(seen) == epoch_items(old, 0)
    assert {c.epoch for c in own_starts} == {1} and all(c.item_epoch == 1 for c in own_starts)
    # The new streams then read a whole epoch of the new plan from its beginning.
    epoch1 = []
    for h in range(new_streams):
        for cursor, item in items(new, h, Cursor(1)):
            if cursor.epoch > 1:
                break
            epoch1.append(item)
    assert sorted(epoch1) == epoch_items(new, 1)


def test_carried_groups_read_as_the_old_stream_would_have():
    old = plan(4)
    cursors, _ = run_streams(old, [3, 0, 11, 6])
    # Straight on: each old stream to the end of epoch 0, by (stream, group).
    straight = {}
    for g in range(4):
        for cursor, item in items(old, g, cursors[g]):
            if cursor.epoch > 0:
                break
            straight.setdefault((g, cursor.group), []).append(item)
    new = plan(3)
    got = {}
    for h, start in enumerate(replan(old, cursors, new)):
        for cursor, item in carried_part(new, h, start)[0]:
            c = cursor.carried[0]
            assert (c.num_streams, c.epoch, cursor.item_epoch) == (4, 0, 0)
            got.setdefault((c.stream, c.group), []).append(item)
    assert got == straight


def test_a_second_change_of_world_size_during_the_carried_part():
    old = plan(4)
    cursors, before = run_streams(old, [7, 2, 9, 4])
    middle = plan(3)
    starts = replan(old, cursors, middle)
    cursors2, during = run_streams(middle, [5, 1, 8], starts)
    assert all(c.carried for c in cursors2)  # (some streams on their own plan: the test below)
    last = plan(2)
    starts2 = replan(middle, cursors2, last)
    after = [carried_part(last, h, starts2[h])[0] for h in range(2)]
    seen = [item for got in before + during + after for _, item in got]
    assert sorted(seen) == epoch_items(old, 0)
    # JSON and back, as in a checkpoint.
    assert [Cursor.from_list(json.loads(json.dumps(c.to_list()))) for c in starts2] == starts2


def by_epoch(*reads) -> dict[int, list]:
    """Items read, by the epoch they were read in (a carried group's own epoch)."""
    out: dict[int, list] = {}
    for got in reads:
        for cursor, item in got:
            out.setdefault(cursor.item_epoch, []).append(item)
    return {e: sorted(items) for e, items in out.items()}


def carried_size(p, cursor) -> int:
    return sum(sum(SIZES[s] for s in p.stream_groups(c.epoch, c.stream, c.num_streams)[c.group]) - c.offset
               for c in cursor.carried)


def test_a_stream_an_epoch_behind_carries_that_epoch_too():
    old = plan(2)
    epoch0_of_stream0 = sum(SIZES[s] for group in old.stream_groups(0, 0) for s in group)
    cursors, before = run_streams(old, [epoch0_of_stream0 + 3, 4])
    assert (cursors[0].epoch, cursors[1].epoch) == (1, 0)
    new = plan(3)
    starts = replan(old, cursors, new)
    assert {s.epoch for s in starts} == {2}
    after = [carried_part(new, h, starts[h])[0] for h in range(3)]
    assert by_epoch(*before, *after) == {0: epoch_items(old, 0), 1: epoch_items(old, 1)}


def test_a_second_change_while_some_streams_read_their_own_plan():
    old = plan(4)
    cursors, before = run_streams(old, [7, 2, 9, 4])
    middle = plan(3)
    starts = replan(old, cursors, middle)
    # Stream 0 finishes its carried groups and reads 5 of its own epoch 1; the others are still carrying.
    cursors2, during = run_streams(middle, [carried_size(middle, starts[0]) + 5, 1, 3], starts)
    assert not cursors2[0].carried and cursors2[0].epoch == 1 and all(c.carried for c in cursors2[1:])
    last = plan(2)
    starts2 = replan(middle, cursors2, last)
    assert {s.epoch for s in starts2} == {2}
    after = [carried_part(last, h, starts2[h])[0] for h in range(2)]
    assert by_epoch(*before, *during, *after) == {0: epoch_items(old, 0), 1: epoch_items(old, 1)}


def test_the_same_stream_count_keeps_every_stream():
    old = plan(4, world=2)
    cursors, _ = run_streams(old, [3, 5, 0, 8])
    assert replan(old, cursors, plan(4, world=4)) == cursors
    with pytest.raises(ValueError, match="only the stream count"):
        replan(old, cursors, ShardPlan(len(SIZES), seed=8, world_size=1, streams_per_rank=3, shards_per_group=2))


# -- the loader --------------------------------------------------------------------------------------

def states_after(shards, world, batches, **kw):
    out = []
    for rank in range(world):
        loader = ShardLoader(config(shards, batch_size=3, **kw), rank=rank, world_size=world)
        seen = keys_of(take(loader, batches))
        out.append((json.loads(json.dumps(loader.state_dict())), seen))
    return [s for s, _ in out], [k for _, seen in out for k in seen]


def carried_samples(state) -> int:
    """Samples left in the carried groups of a rank's state (2 shards of PER_SHARD per group, no filter)."""
    return sum(2 * PER_SHARD - c[4] for cursor in state["cursors"] if len(cursor) > 3 for c in cursor[3])


def resumed(shards, states, rank, world, **kw):
    loader = ShardLoader(config(shards, batch_size=3, **kw), rank=rank, world_size=world)
    line = loader.load_state_dicts(states)
    return loader, line


def test_loader_resumed_on_three_ranks_reads_the_rest_of_the_epoch_once(shards):
    states, before = states_after(shards, world=2, batches=2)  # 2 ranks x 2 streams, one batch each
    keys = list(before)
    for rank in range(3):
        loader, line = resumed(shards, states, rank, 3, num_workers=1)
        assert "dealt to the new streams, then epoch 1" in line
        left = carried_samples(loader.state_dict())
        assert left % 3 == 0
        keys += keys_of(take(loader, left // 3))
        assert all(len(c) == 3 or c[3][-1][4] == 2 * PER_SHARD for c in loader.state_dict()["cursors"])
    assert sorted(keys) == sorted(all_keys(shards)) and len(keys) == NUM_SHARDS * PER_SHARD


def test_loader_carried_state_resumes_exactly_and_changes_again(shards):
    states, before = states_after(shards, world=2, batches=2)
    straight = take(resumed(shards, states, 0, 3, num_workers=1)[0], 4)
    first = resumed(shards, states, 0, 3, num_workers=1)[0]
    head = take(first, 2)
    again = ShardLoader(config(shards, batch_size=3, num_workers=1), rank=0, world_size=3)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same_batches(head + take(again, 2), straight)

    # 3 ranks, one batch each, then onto 2 ranks: still every sample of epoch 0 once.
    keys, middle = list(before), []
    for rank in range(3):
        loader = resumed(shards, states, rank, 3, num_workers=1)[0]
        keys += keys_of(take(loader, 1))
        middle.append(json.loads(json.dumps(loader.state_dict())))
    for rank in range(2):
        loader, _ = resumed(shards, middle, rank, 2, num_workers=1)
        keys += keys_of(take(loader, carried_samples(loader.state_dict()) // 3))
    assert sorted(keys) == sorted(all_keys(shards))


def test_loader_keeps_the_order_when_the_stream_count_is_kept(shards):
    # 2 ranks x 1 stream -> 1 rank x 2 streams: batch n of the new rank comes from old rank n % 2's stream.
    states, _ = states_after(shards, world=2, batches=2, num_workers=1)
    straight = [take(ShardLoader(config(shards, batch_size=3, num_workers=1), rank=r, world_size=2), 5)[2:]
                for r in range(2)]
    loader, line = resumed(shards, states, 0, 1, num_workers=2)
    assert "every stream goes on where it was" in line
    got = take(loader, 6)
    assert_same_batches(got[0::2], straight[0])
    assert_same_batches(got[1::2], straight[1])


def test_loader_refuses_an_incomplete_set_of_states(shards):
    states, _ = states_after(shards, world=2, batches=1)
    with pytest.raises(ValueError, match="every rank of one run"):
        resumed(shards, states[:1], 0, 3)
    with pytest.raises(ValueError, match="seed changed"):
        resumed(shards, states, 0, 3, seed=9)
