"""Precomputed-latent shards (data/latent_format.py): a written shard round-trips through the loader,
and a dropped caption gets the unconditional embedding CLIP("") stored with the shard."""
import numpy as np
import pytest
import torch

from data.latent_format import LatentShardWriter
from data.loader import LoaderConfig, ShardLoader, _tokenizer

RES, N = 64, 12  # 8x8 latents


def sample_arrays(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    mean = rng.normal(0, 5, (4, RES // 8, RES // 8)).astype(np.float32)
    std = rng.uniform(1e-4, 0.1, (4, RES // 8, RES // 8)).astype(np.float32)
    return mean, std, rng.normal(0, 1, (77, 768)).astype(np.float32)


UNCOND = np.random.default_rng(99).normal(0, 1, (77, 768)).astype(np.float32)


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("latents")
    paths = []
    for shard in range(2):
        path = root / f"{shard:05d}.tar"
        with LatentShardWriter(path, uncond_context=UNCOND) as w:
            for i in range(N // 2):
                j = shard * 100 + i
                mean, std, ctx = sample_arrays(j)
                w.write(f"{j:06d}", mean, torch.from_numpy(std), f"caption {j}", {"key": f"{j:06d}"}, context=ctx)
        paths.append(str(path))
    # A shard written without contexts (and so without the unconditional embedding), and one
    # with a latent of the wrong resolution.
    with LatentShardWriter(root / "nocontext.tar") as w:
        w.write("000900", *sample_arrays(900)[:2], "caption 900")
    with LatentShardWriter(root / "wrongsize.tar") as w:
        w.write("000901", np.zeros((4, 4, 4)), np.ones((4, 4, 4)), "caption 901")
        w.write("000902", *sample_arrays(902)[:2], "caption 902")  # one good one: not a wrong-size shard
    return paths + [str(root / "nocontext.tar"), str(root / "wrongsize.tar")]


def test_latent_shard_round_trips_and_dropout_uses_uncond(latent_shards):
    cfg = LoaderConfig(shards=tuple(latent_shards[:2]), resolution=RES, batch_size=4, num_workers=0,
                       latents=True, context=True, caption_dropout=0.5)
    it = iter(ShardLoader(cfg))
    batches = [next(it) for _ in range(6)]  # two epochs
    it.close()
    b = batches[0]
    assert set(b) == {"latent_mean", "latent_std", "context", "input_ids", "captions", "keys", "dropped", "json"}
    assert b["latent_mean"].shape == b["latent_std"].shape == (4, 4, RES // 8, RES // 8)
    assert b["context"].shape == (4, 77, 768) and b["context"].dtype == torch.float32
    empty_ids = _tokenizer()([""])[0]
    seen = set()
    for b in batches:
        for i, key in enumerate(b["keys"]):
            mean, std, ctx = sample_arrays(int(key))
            # Stored as float16: equal to the float16 rounding of what was written.
            assert torch.equal(b["latent_mean"][i], torch.from_numpy(mean.astype(np.float16).astype(np.float32)))
            assert torch.equal(b["latent_std"][i], torch.from_numpy(std.astype(np.float16).astype(np.float32)))
            dropped = bool(b["dropped"][i])
            seen.add(dropped)
            want = UNCOND if dropped else ctx
            assert torch.equal(b["context"][i], torch.from_numpy(want.astype(np.float16).astype(np.float32)))
            assert b["captions"][i] == ("" if dropped else f"caption {int(key)}")
            assert torch.equal(b["input_ids"][i], empty_ids) == dropped
    assert seen == {True, False}


def test_latent_shards_without_uncond_or_of_wrong_size_are_counted(latent_shards):
    cfg = LoaderConfig(shards=tuple(latent_shards), resolution=RES, batch_size=2, num_workers=0,
                       shards_per_group=4, latents=True, context=True)
    loader = ShardLoader(cfg)
    it = iter(loader)
    keys = [k for _ in range(N // 2) for k in next(it)["keys"]]  # one epoch, one group
    it.close()
    assert len(set(keys)) == N and "000900" not in keys
    assert loader.skip_counts() == {"no_uncond_context": 3}
    # Without contexts the shard without them is fine; the wrong size is still caught at decode.
    loader = ShardLoader(LoaderConfig(shards=tuple(latent_shards), resolution=RES, batch_size=1, num_workers=0,
                                      shards_per_group=4, latents=True))
    it = iter(loader)
    keys = [next(it)["keys"][0] for _ in range(N + 3)]  # the epoch, and one more: the bad one was decoded
    it.close()
    assert "000900" in keys[:N + 2] and "000902" in keys[:N + 2] and "000901" not in keys
    assert loader.skip_counts() == {"bad_latent": 1}


def test_writer_refuses_inconsistent_samples(tmp_path):
    mean, std, ctx = sample_arrays(0)
    with LatentShardWriter(tmp_path / "x.tar") as w:
        with pytest.raises(ValueError, match="uncond_context"):
            w.write("000001", mean, std, "c", context=ctx)
        with pytest.raises(ValueError, match=r"\[4, h, w\]"):
            w.write("000001", mean[:3], std[:3], "c")
        with pytest.raises(ValueError, match="std >= 0"):
            w.write("000001", mean, -std, "c")
        with pytest.raises(ValueError, match="dot"):
            w.write("a.b", mean, std, "c")
