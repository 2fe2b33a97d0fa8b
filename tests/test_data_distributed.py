"""Two real data-parallel processes (torch.distributed, gloo): the loader takes rank and world size
from the process group, each rank gets the batches a simulated rank gets, and the ranks' samples
are disjoint; a rank resumes exactly from its own state."""
import json
import multiprocessing

import torch.distributed as dist

from data.loader import LoaderConfig, ShardLoader
from data.synth import write_synthetic_shards

TIMEOUT_S = 60


def config(shards) -> LoaderConfig:
    return LoaderConfig(shards=tuple(shards), resolution=32, batch_size=3, num_workers=2,
                        shards_per_group=2, shuffle_buffer=4, caption_dropout=0.3, timeout_s=TIMEOUT_S)


def take_keys(loader: ShardLoader, n: int) -> list[list[str]]:
    it = iter(loader)
    keys = [next(it)["keys"] for _ in range(n)]
    it.close()
    return keys


def rank_main(rank: int, store: str, shards: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        loader = ShardLoader(config(shards))
        straight = take_keys(loader, 4)
        resumed = ShardLoader(config(shards))
        resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
        straight += take_keys(resumed, 4)
        everyone = [None, None]
        dist.all_gather_object(everyone, straight)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"rank": loader.rank, "world": loader.world_size, "all": everyone}, f)
    finally:
        dist.destroy_process_group()


def test_two_process_group(tmp_path):
    shards = [str(p) for p in write_synthetic_shards(tmp_path / "shards", 8, 6, image_size=40)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=rank_main, args=(r, str(tmp_path / "store"), shards, str(tmp_path / "out")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    gathered = results[0]["all"]
    for rank in range(2):
        assert gathered[rank] == take_keys(ShardLoader(config(shards), rank=rank, world_size=2), 8)
    flat = [k for rank_keys in gathered for batch in rank_keys[:4] for k in batch]  # 2 x 12: within epoch 0
    assert len(flat) == len(set(flat)) == 24
