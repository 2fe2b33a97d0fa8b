"""The streaming loader: split across ranks and workers, per-epoch reshuffle, exact resume, filters,
caption dropout and transforms, on small synthetic shards (data/synth.py)."""
import io
import json
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import data.loader as loader_module
from data.filters_runtime import MissingColumns, stage_filter
from data.loader import LoaderConfig, ShardLoader, _tokenizer
from data.samples import read_candidates
from data.plan import ShardPlan
from data.synth import write_synthetic_shards

NUM_SHARDS, PER_SHARD = 8, 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return [str(p) for p in write_synthetic_shards(tmp_path_factory.mktemp("synth"), NUM_SHARDS, PER_SHARD, image_size=40)]


def all_keys(paths) -> dict[str, dict]:
    out = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    out[meta["key"]] = meta
    return out


def take(loader: ShardLoader, n: int) -> list[dict]:
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()  # shuts the workers down now


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def config(shards, **kw) -> LoaderConfig:
    base = dict(shards=tuple(shards), resolution=32, batch_size=4, num_workers=2, shards_per_group=2, shuffle_buffer=5,
                timeout_s=60)
    return LoaderConfig(**{**base, **kw})


def test_plan_splits_every_epoch_disjoint_and_complete():
    plan = ShardPlan(num_shards=11, seed=3, world_size=2, streams_per_rank=2, shards_per_group=2)
    orders = []
    for epoch in range(3):
        got = [s for g in range(plan.num_streams) for group in plan.stream_groups(epoch, g) for s in group]
        assert sorted(got) == list(range(11))
        orders.append(plan.epoch_order(epoch))
    assert orders[0] != orders[1] != orders[2]
    assert ShardPlan(11, 3, 2, 2, 2).epoch_order(1) == orders[1]
    with pytest.raises(ValueError, match="cannot feed 12 streams"):
        ShardPlan(num_shards=11, seed=0, world_size=3, streams_per_rank=4, shards_per_group=1)


def test_ranks_and_workers_split_an_epoch_disjoint_and_complete(shards):
    # 8 shards of 6 over 2 ranks x 2 streams: each stream has 12 samples (3 batches) per epoch.
    per_rank = [keys_of(take(ShardLoader(config(shards), rank=r, world_size=2), 6)) for r in range(2)]
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything)) == NUM_SHARDS * PER_SHARD
    assert set(everything) == set(all_keys(shards))


def test_reshuffled_every_epoch_and_deterministic(shards):
    cfg = config(shards, num_workers=0, batch_size=6)  # one stream: an epoch is 8 batches
    run = keys_of(take(ShardLoader(cfg), 16))
    epoch0, epoch1 = run[:48], run[48:]
    assert sorted(epoch0) == sorted(epoch1) == sorted(all_keys(shards))
    assert epoch0 != epoch1
    assert keys_of(take(ShardLoader(cfg), 16)) == run
    assert keys_of(take(ShardLoader(config(shards, num_workers=0, batch_size=6, seed=1)), 8)) != epoch0


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert x["captions"] == y["captions"]
        assert torch.equal(x["dropped"], y["dropped"])
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["pixels"], y["pixels"])


@pytest.mark.parametrize("resume_workers", [2, 1])
def test_exact_resume_two_ranks_two_workers(shards, resume_workers):
    # Random crops and 50% caption dropout, so pixels and captions depend on the per-sample RNG;
    # 10 batches cross the first epoch boundary (6 batches per epoch per rank).
    cfg = config(shards, crop="random", caption_dropout=0.5)
    for rank in range(2):
        straight = take(ShardLoader(cfg, rank=rank, world_size=2), 10)
        first = ShardLoader(cfg, rank=rank, world_size=2)
        head = take(first, 5)
        state = json.loads(json.dumps(first.state_dict()))
        second = ShardLoader(config(shards, crop="random", caption_dropout=0.5, num_workers=resume_workers),
                             rank=rank, world_size=2)
        second.load_state_dict(state)
        tail = take(second, 5)
        assert_same_batches(head + tail, straight)
        assert any(c == "" for b in straight for c in b["captions"])


def test_exact_resume_at_every_position(shards):
    # In-process with two streams, one shard per group and a 3-sample buffer: the cursors fall
    # on, before and after group and epoch boundaries.
    cfg = config(shards, num_workers=0, streams_per_rank=2, shards_per_group=1, shuffle_buffer=3, batch_size=5,
                 crop="random", caption_dropout=0.5)
    straight = take(ShardLoader(cfg), 14)
    for split in range(1, 14):
        first = ShardLoader(cfg)
        head = take(first, split)
        second = ShardLoader(cfg)
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert_same_batches(head + take(second, 14 - split), straight)


def test_iterating_again_continues_where_it_stopped(shards):
    cfg = config(shards, num_workers=2)
    straight = take(ShardLoader(cfg), 6)
    loader = ShardLoader(cfg)
    assert_same_batches(take(loader, 3) + take(loader, 3), straight)


def test_resume_refuses_a_different_split(shards):
    loader = ShardLoader(config(shards), rank=1, world_size=2)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="load_state_dicts"):
        ShardLoader(config(shards), rank=1, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed changed"):
        ShardLoader(config(shards, seed=5), rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="shards"):
        ShardLoader(config(shards[:-1]), rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_workers in \[1, 2\]"):
        ShardLoader(config(shards, num_workers=3), rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="set streams_per_rank to the saved value"):
        ShardLoader(config(shards, streams_per_rank=4), rank=1, world_size=2).load_state_dict(state)


def expected_rule(m: dict) -> str | None:
    # laion-improved-aesthetics (SD v1-2/v1-3) plus punsafe < 0.1, written out independently of
    # data.stages; the first failing rule in data.stages' order is the counted one.
    checks = [("min_width", m["original_width"] >= 512), ("min_height", m["original_height"] >= 512),
              ("min_aesthetic", m["aesthetic"] > 5.0), ("max_pwatermark", m["pwatermark"] < 0.5),
              ("max_punsafe", m["punsafe"] < 0.1)]
    return next((f"filter_{rule}" for rule, ok in checks if not ok), None)


def test_filters_drop_exactly_the_samples_that_break_the_rules(shards, tmp_path):
    filters = replace(stage_filter("laion-improved-aesthetics"), max_punsafe=0.1)
    metas = all_keys(shards)
    expected_counts: dict[str, int] = {}
    kept = set()
    for key, m in metas.items():
        reason = expected_rule(m)
        if reason is None:
            kept.add(key)
        else:
            expected_counts[reason] = expected_counts.get(reason, 0) + 1
    # The synthetic data has something for every rule to remove, and something left.
    assert len(expected_counts) == 5 and 0 < len(kept) < len(metas)
    # One stream, one group: the first len(kept) samples are the whole first epoch.
    loader = ShardLoader(config(shards, num_workers=0, batch_size=1, shards_per_group=NUM_SHARDS, filters=filters))
    got = keys_of(take(loader, len(kept)))
    assert sorted(got) == sorted(kept)
    assert loader.skip_counts() == dict(sorted(expected_counts.items()))
    # The score under the other name LAION's aesthetics subsets give it keeps exactly the same samples.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for path in shards:
        rewrite_json(path, renamed / Path(path).name, lambda m: {("AESTHETIC_SCORE" if k == "aesthetic" else k): v
                                                                 for k, v in m.items()})
    loader = ShardLoader(config(sorted(map(str, renamed.iterdir())), num_workers=0, batch_size=1,
                                shards_per_group=NUM_SHARDS, filters=filters))
    assert sorted(keys_of(take(loader, len(kept)))) == sorted(kept)
    assert loader.skip_counts() == dict(sorted(expected_counts.items()))


def rewrite_json(src, dst, change) -> None:
    with tarfile.open(src) as tar, tarfile.open(dst, "w") as out:
        for m in tar:
            data = tar.extractfile(m).read()
            if m.name.endswith(".json") and change is not None:
                data = json.dumps(change(json.loads(data))).encode()
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))


def test_a_column_no_sample_has_stops_at_the_first_shard(shards, tmp_path, monkeypatch):
    """A json without a column the filters read in any sample of a shard is a setting: the loader says so
    after that shard, instead of skipping every sample of every shard (epochs over the whole dataset)."""
    for path in shards:
        rewrite_json(path, tmp_path / Path(path).name, lambda m: {k: v for k, v in m.items() if k != "pwatermark"})
    # One shard whose json is unreadable in every sample: bad data, counted, not a reason to stop.
    rewrite_json(shards[0], tmp_path / "bad.tar", None)
    with tarfile.open(tmp_path / "bad.tar") as tar, tarfile.open(tmp_path / "badjson.tar", "w") as out:
        for m in tar:
            data = b"{not json" if m.name.endswith(".json") else tar.extractfile(m).read()
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    badjson = str(tmp_path / "badjson.tar")
    counts = Counter()
    assert list(read_candidates(badjson, 0, stage_filter("laion2b-en"), False, False, counts)) != []
    assert list(read_candidates(badjson, 0, stage_filter("laion-improved-aesthetics"), False, False, counts)) == []
    assert counts == Counter(missing_metadata=PER_SHARD)
    reads = []
    monkeypatch.setattr(loader_module, "read_candidates",
                        lambda url, *a, **k: reads.append(url) or read_candidates(url, *a, **k))
    urls = [str(tmp_path / Path(p).name) for p in shards]
    loader = ShardLoader(config(urls, num_workers=0, shards_per_group=1, filters=stage_filter("laion-improved-aesthetics")))
    with pytest.raises(MissingColumns, match=r"no sample's json has 'pwatermark', which the filters of stage.data.subset "
                                             r"read.* \(json keys: aesthetic, background, .*\)"):
        take(loader, 1)
    assert len(reads) == 1


def test_caption_dropout_rate_and_empty_captions(shards):
    loader = ShardLoader(config(shards, num_workers=0, batch_size=8, caption_dropout=0.3))
    batches = take(loader, 24)  # 4 epochs of 48
    dropped = torch.cat([b["dropped"] for b in batches])
    assert abs(dropped.float().mean().item() - 0.3) < 0.08
    empty_ids = _tokenizer()([""])[0]
    for b in batches:
        for i, caption in enumerate(b["captions"]):
            assert (caption == "") == bool(b["dropped"][i])
            assert torch.equal(b["input_ids"][i], empty_ids) == bool(b["dropped"][i])
            if not b["dropped"][i]:
                assert caption == b["json"][i]["caption"]
    # Dropout differs between epochs: the same sample is not always dropped.
    by_key: dict[str, set] = {}
    for b in batches:
        for k, d in zip(b["keys"], b["dropped"].tolist()):
            by_key.setdefault(k, set()).add(d)
    assert any(len(v) == 2 for v in by_key.values())


@pytest.mark.parametrize("resolution,crop", [(32, "center"), (64, "random")])
def test_batch_shapes_and_range(shards, resolution, crop):
    b = take(ShardLoader(config(shards, resolution=resolution, crop=crop, num_workers=0)), 1)[0]
    assert set(b) == {"pixels", "input_ids", "captions", "keys", "dropped", "json"}
    assert b["pixels"].shape == (4, 3, resolution, resolution) and b["pixels"].dtype == torch.float32
    assert b["pixels"].min() >= -1 and b["pixels"].max() <= 1 and b["pixels"].is_contiguous()
    assert b["input_ids"].shape == (4, 77) and b["input_ids"].dtype == torch.long


def test_config_is_checked(shards):
    for bad in (dict(crop="left"), dict(resolution=100), dict(context=True), dict(caption_dropout=1.5),
                dict(num_workers=2, streams_per_rank=3), dict(resize="longer_side")):
        with pytest.raises(ValueError):
            config(shards, **bad)
    loader = ShardLoader(config(shards))
    assert (loader.rank, loader.world_size) == (0, 1)  # no process group: a single rank
    with pytest.raises(ValueError, match="rank 2"):
        ShardLoader(config(shards), rank=2, world_size=2)
