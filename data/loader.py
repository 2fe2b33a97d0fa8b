"""Streaming training loader over WebDataset tar shards, with exact resume.

    loader = ShardLoader(LoaderConfig(shards="pipe:aws s3 cp s3://b/{00000..04999}.tar -", ...))
    loader.load_state_dict(checkpoint["loader"])          # optional, before iterating
    batches = iter(loader)
    for step in range(num_steps):
        batch = next(batches)                             # {"pixels", "input_ids", "captions", ...}
        ...
        checkpoint["loader"] = loader.state_dict()        # JSON-able, one per rank
        log(loader.skip_counts())

Equal batch counts on every rank: the loader is endless. Each rank's streams cycle through epochs on
their own (see data/plan.py), so no rank can run out before another however unevenly the shards
are filled or filtered, and the trainer decides the length of a run in steps, as SD v1's recipe
does. The price is that ranks do not cross epoch boundaries at the same step; every sample is still
seen once per epoch of its stream.

Exact resume: a batch is built in one DataLoader worker from one stream, and the worker returns
with it the stream's cursor and the skip counts since that stream's previous batch. The DataLoader
returns worker outputs round-robin (batch n from worker n % num_workers), and the streams are
assigned so that batch n always comes from stream n % streams_per_rank, so the state
(batches consumed, one cursor per stream, skip totals) covers exactly what the trainer has received,
not what workers have prefetched. Restarting builds every stream from its cursor. The state can be
restored with a different num_workers as long as it divides streams_per_rank (which is why
streams_per_rank is a setting of its own), but not with a different shard list.

A different world size: `load_state_dicts` takes the states of all the old ranks and deals out what
their streams had left of their epochs (data/plan.py, `replan`): nothing is skipped or seen twice, in
a new order.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.plan import Cursor, ShardPlan, replan, stream_items
from data.samples import RESUME_INEXACT, Decoder, read_candidates, stack
from data.stages import SubsetFilter
from data.transforms import CROPS, RESIZES, to_pixels

STATE_FORMAT = "sd-repro/loader-state/1"


@dataclass(frozen=True)
class LoaderConfig:
    # Shard URLs: local paths, `file:` or `pipe:CMD` URLs; a string is brace-expanded
    # ("/data/{00000..00999}.tar"), as is each entry of a tuple.
    shards: tuple[str, ...] | str
    resolution: int = 256  # SD v1: 256 for the first 237k steps of v1-1, then 512
    batch_size: int = 4  # per rank micro-batch
    num_workers: int = 2  # DataLoader worker processes per rank (0: in the training process)
    # Independent sample streams per rank; fixed for a run (it is part of the shard split) so that
    # num_workers may change on resume. None: max(1, num_workers). Must be a multiple of num_workers.
    streams_per_rank: int | None = None
    seed: int = 0
    # Replace the caption by "" with this probability, for classifier-free guidance (SD v1-3: 0.1; the
    # model card gives none for v1-1 and v1-2).
    caption_dropout: float = 0.0
    crop: str = "center"  # or "random"
    resize: str = "shorter_side"
    # Shards read interleaved by one stream, and the shuffle buffer (in samples) they pass through.
    # Memory per stream: shuffle_buffer encoded images (~1000 x 50 KiB at 512), plus the open tars.
    shards_per_group: int = 4
    shuffle_buffer: int = 1000
    # Per-sample stage rules for shards downloaded without them, reading the sample's json:
    # `data.filters_runtime.stage_filter("laion-improved-aesthetics")`, or any SubsetFilter whose
    # columns are the json's names (MetadataColumns.img2dataset_json()). None: keep everything.
    filters: SubsetFilter | None = None
    # Precomputed-latent shards (data/latent_format.py) instead of images; `context` also yields
    # the precomputed text embeddings.
    latents: bool = False
    context: bool = False
    # Begin a fresh run at this epoch (the trainer gives each stage its own `seed` instead: see
    # train.config.stage_seed; a change of world size needs neither: see load_state_dicts).
    start_epoch: int = 0
    pin_memory: bool = False
    prefetch_factor: int = 2
    # Seconds to wait for a worker's next batch before raising (0: forever). A stuck `pipe:` command
    # then fails the run, which resumes exactly from its checkpoint, instead of hanging it.
    timeout_s: float = 0.0
    # Stop when a stream has met this many unreadable shards since its last usable sample (0: never). A few
    # bad shards are skipped and counted; this many in a row is the access failing (expired credentials, a
    # lost mount), and the stream would otherwise go on skipping, or at worst, with every shard failing, try
    # each about ln(N) times (N shards) before it can tell: days behind a `pipe:` command that takes a second.
    max_unreadable_in_a_row: int = 64

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"loader.resolution={self.resolution} must be a positive multiple of 8 (the VAE factor)")
        if self.batch_size < 1 or self.num_workers < 0 or self.shards_per_group < 1 or self.shuffle_buffer < 1:
            raise ValueError("loader: batch_size, shards_per_group, shuffle_buffer must be >= 1 and num_workers >= 0")
        if self.streams_per_rank is not None and self.streams_per_rank % max(1, self.num_workers):
            raise ValueError(f"loader.streams_per_rank={self.streams_per_rank} must be a multiple of num_workers={self.num_workers}")
        if self.max_unreadable_in_a_row < 0 or self.timeout_s < 0:
            raise ValueError("loader: max_unreadable_in_a_row and timeout_s must be >= 0 (0: no limit)")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"loader.caption_dropout={self.caption_dropout} must be in [0, 1]")
        if self.crop not in CROPS:
            raise ValueError(f"loader.crop={self.crop!r}: choose one of {CROPS}")
        if self.resize not in RESIZES:
            raise ValueError(f"loader.resize={self.resize!r}: choose one of {RESIZES}")
        if self.latents and self.crop != "center":
            raise ValueError(f"loader.crop={self.crop!r} with latents=True: precomputed latents hold the centre crop "
                             "made when they were computed (data/precompute.py); set crop='center', or read image "
                             "shards (latents=False)")
        if self.context and not self.latents:
            raise ValueError("loader.context=True reads precomputed text embeddings: it needs latents=True")


def expand_shards(shards: tuple[str, ...] | list[str] | str) -> list[str]:
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls = [url for pattern in patterns for url in braceexpand(pattern)]
    if not urls:
        raise ValueError("loader.shards is empty")
    return urls


def missing_local_shards(urls: Sequence[str]) -> list[str]:
    """The local shards among `urls` that are not there (`pipe:` ones are not checked). One listing per
    folder, not a stat per shard: a folder of 100k shards on a parallel filesystem lists in seconds.
    The loader would skip each as unreadable and train on the rest, with its epoch and its mix changed."""
    wanted: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for url in urls:
        if not url.startswith("pipe:"):
            folder, name = os.path.split(url.removeprefix("file:"))
            wanted[folder or "."].append((url, name))
    missing = []
    for folder, items in wanted.items():
        try:
            with os.scandir(folder) as entries:
                present = {e.name for e in entries if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing += [url for url, name in items if name not in present]
    return missing


@lru_cache(maxsize=1)
def _tokenizer():
    # Built once in the training process, before the workers fork, so they share it for free
    # (building it parses 49k BPE merges: about a second per process otherwise).
    from models.tokenizer import CLIPTokenizer
    return CLIPTokenizer()


def _ignore_stop_signals(worker_id: int) -> None:
    """SLURM sends SIGTERM to every process of a job it stops or requeues, loader workers included, and a
    terminal's Ctrl-C (torchrun's agent passing it on, too) sends SIGINT to the whole process group. A worker
    that dies of it takes its rank down before the trainer can checkpoint; the trainer (their parent)
    handles the signal and shuts the workers down itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if rank is not None or world_size is not None:
        raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collate(samples: list[dict], latents: bool, context: bool, tokenizer) -> dict:
    """Decoded samples (data.samples.Decoder) -> one batch: captions, keys, metadata, token ids, and the
    images as pixels in [-1, 1] or the latents' mean and std (and the precomputed context)."""
    captions = [s["caption"] for s in samples]
    batch = {"captions": captions, "keys": [s["key"] for s in samples], "json": [s["json"] for s in samples],
             "dropped": torch.tensor([s["dropped"] for s in samples]), "input_ids": tokenizer(captions)}
    if latents:
        batch["latent_mean"] = torch.from_numpy(stack(samples, "latent_mean"))
        batch["latent_std"] = torch.from_numpy(stack(samples, "latent_std"))
        if context:
            batch["context"] = torch.from_numpy(stack(samples, "context"))
    else:
        batch["pixels"] = to_pixels([s["image"] for s in samples])
    return batch


class _Stream:
    """One stream inside a worker: candidates in plan order -> decoded samples -> batches."""

    def __init__(self, ds: "_StreamDataset", local: int, cursor: Cursor):
        self.ds, self.counts = ds, Counter()
        self.cursor = cursor
        self.good_in_group = False
        self._before_replay = Counter()
        self.barren: set[int] = set()  # shards of consecutive groups that gave no sample
        # The errors of the shards that could not be read since the last usable sample.
        self.unreadable: list[str] | None = [] if ds.config.max_unreadable_in_a_row else None
        self.items = stream_items(ds.plan, ds.rank * ds.plan.streams_per_rank + local, cursor,
                                  ds.config.shuffle_buffer, self._read_shard, self._replay,
                                  self._group_end)

    def _read_shard(self, epoch: int, shard: int):
        cfg = self.ds.config
        return read_candidates(self.ds.urls[shard], shard, cfg.filters, cfg.latents, cfg.context, self.counts,
                               latent_size=cfg.resolution // 8, unreadable=self.unreadable)

    def _replay(self, event: str) -> None:
        # The replayed reads were counted before the state was saved: forget them (in place, the shard
        # readers hold this Counter).
        if event == "begin":
            self._before_replay = Counter(self.counts)
            return
        self.counts.clear()
        self.counts.update(self._before_replay)
        if event == "exact":
            self._usable()  # a saved cursor always follows a good sample
        else:
            self.counts[RESUME_INEXACT] += 1

    def _usable(self) -> None:
        self.good_in_group = True
        if self.unreadable:
            self.unreadable.clear()

    def _group_end(self, shards: list[int]) -> None:
        limit = self.ds.config.max_unreadable_in_a_row
        if limit and len(self.unreadable) >= limit:
            raise RuntimeError(
                f"{len(self.unreadable)} shards in a row could not be read, with no usable sample between them "
                f"(the last: {self.unreadable[-1]}). Isolated bad shards are skipped and counted; this many is the "
                "shards' access failing (credentials, a mount, the pipe: command): fix it and resume, or raise "
                "stage.data.max_unreadable_in_a_row (0: skip them all)")
        if self.good_in_group:
            self.barren.clear()
        else:
            self.barren.update(shards)
            if len(self.barren) == len(self.ds.urls):
                raise RuntimeError(
                    f"none of the {len(self.ds.urls)} shards gives a usable sample (skips: {dict(self.counts)}); "
                    "check the shard URLs, their access and the filters")
        self.good_in_group = False

    def next_batch(self) -> tuple[list[dict], Cursor, Counter]:
        samples = []
        while len(samples) < self.ds.config.batch_size:
            self.cursor, candidate = next(self.items)
            sample = self.ds.decoder(self.cursor.item_epoch, candidate, self.counts)
            if sample is not None:
                self._usable()
                samples.append(sample)
        # Copied and cleared in place: the shard readers hold this Counter and keep counting into it.
        delta = Counter(self.counts)
        self.counts.clear()
        return samples, self.cursor, delta


class _StreamDataset(IterableDataset):
    """What each DataLoader worker runs. Worker p of K produces the rank's batches
    n = start + p + j*K (j = 0, 1, ...), batch n from stream n % streams_per_rank."""

    def __init__(self, loader: "ShardLoader"):
        self.config, self.urls, self.plan, self.rank = loader.config, loader.urls, loader.plan, loader.rank
        self.start, self.cursors = loader._batches, list(loader._cursors)
        cfg = self.config
        self.decoder = Decoder(cfg.seed, cfg.resolution, cfg.crop, cfg.caption_dropout, cfg.latents, cfg.context)
        self.tokenizer = _tokenizer()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams: dict[int, _Stream] = {}
        n = self.start + worker
        while True:
            local = n % self.plan.streams_per_rank
            if local not in streams:
                streams[local] = _Stream(self, local, self.cursors[local])
            samples, cursor, skips = streams[local].next_batch()
            batch = collate(samples, self.config.latents, self.config.context, self.tokenizer)
            batch["_position"] = (n, local, cursor.to_list(), dict(skips))
            yield batch
            n += num_workers



class ShardLoader:
    """Endless iterator of batches for one data-parallel rank (rank/world_size default to
    torch.distributed's, or 0/1 without it). See the module docstring for the guarantees."""

    def __init__(self, config: LoaderConfig, rank: int | None = None, world_size: int | None = None):
        self.config = config
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        self.urls = expand_shards(config.shards)
        self._set_streams(config.streams_per_rank or max(1, config.num_workers))
        self._skips: Counter = Counter()
        self._iterating = False

    def _set_streams(self, streams_per_rank: int) -> None:
        if streams_per_rank % max(1, self.config.num_workers):
            raise ValueError(f"num_workers={self.config.num_workers} must divide streams_per_rank={streams_per_rank}")
        self.plan = ShardPlan(len(self.urls), self.config.seed, self.world_size, streams_per_rank, self.config.shards_per_group)
        self._batches = 0
        self._cursors = [Cursor(self.config.start_epoch, 0, 0)] * streams_per_rank

    def __iter__(self) -> Iterator[dict]:
        if self._iterating:
            raise RuntimeError("this loader is already being iterated; it has one position, so use one iterator")
        self._iterating = True
        cfg = self.config
        loader = DataLoader(_StreamDataset(self), batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
                            timeout=cfg.timeout_s if cfg.num_workers else 0, worker_init_fn=_ignore_stop_signals)
        batches = iter(loader)
        try:
            for batch in batches:
                n, local, cursor, skips = batch.pop("_position")
                if n != self._batches or local != n % self.plan.streams_per_rank:
                    raise RuntimeError(f"loader got batch {n} (stream {local}) where batch {self._batches} was due: "
                                       "the DataLoader no longer returns worker outputs round-robin")
                self._cursors[local] = Cursor.from_list(cursor)
                self._skips.update(skips)
                self._batches += 1
                yield batch
        finally:
            self._iterating = False
            # Stop the workers here, when the iteration is closed, rather than when the iterator is collected:
            # after an exception the traceback keeps it alive until exit, and at exit multiprocessing sends
            # its daemon workers SIGTERM, which they ignore (_ignore_stop_signals), then joins them: forever.
            if hasattr(batches, "_shutdown_workers"):  # what the iterator's own __del__ calls
                batches._shutdown_workers()

    def skip_counts(self) -> dict[str, int]:
        """Samples and shards not used so far, by reason (data/shard_io.py, data/samples.py,
        data/filters_runtime.py), up to the last batch handed out."""
        return dict(sorted(self._skips.items()))

    def _fingerprint(self) -> dict:
        # What the meaning of a cursor depends on: changing any of it makes the saved position meaningless.
        cfg = self.config
        return {"shards": hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16], "num_shards": len(self.urls),
                "seed": cfg.seed, "shards_per_group": cfg.shards_per_group, "shuffle_buffer": cfg.shuffle_buffer,
                "filters": cfg.filters.to_dict() if cfg.filters is not None else None, "latents": cfg.latents, "context": cfg.context}

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "rank": self.rank, "world_size": self.world_size,
                "streams_per_rank": self.plan.streams_per_rank, "batches": self._batches,
                "cursors": [c.to_list() for c in self._cursors], "skip_counts": self.skip_counts(),
                "fingerprint": self._fingerprint()}

    def _check_state(self, state: dict) -> None:
        if self._iterating:
            raise RuntimeError("load_state_dict() must come before iterating the loader")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a loader state of format {STATE_FORMAT!r}: {state.get('format')!r}")
        saved, now = state["fingerprint"], self._fingerprint()
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            raise ValueError(f"loader state does not match this loader: {', '.join(changed)} changed "
                             f"({ {k: saved.get(k) for k in changed} } -> { {k: now.get(k) for k in changed} }). "
                             "A saved position only means something for the same shards, seed, shuffle and filters")

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly from this rank's saved state (same world size); see load_state_dicts otherwise."""
        self._check_state(state)
        if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            raise ValueError(
                f"loader state of rank {state['rank']} of {state['world_size']} cannot be restored on rank {self.rank} "
                f"of {self.world_size}: each rank's position only exists within its own split of the shards. Resume with "
                f"world_size={state['world_size']}, or pass the states of all {state['world_size']} ranks to "
                "load_state_dicts(), which hands out what they had left")
        streams = int(state["streams_per_rank"])
        if self.config.streams_per_rank not in (None, streams):
            raise ValueError(f"loader state has streams_per_rank={streams}, the config {self.config.streams_per_rank}: "
                             "streams are part of the shard split; set streams_per_rank to the saved value")
        if streams % max(1, self.config.num_workers):
            options = [k for k in range(1, streams + 1) if streams % k == 0]
            raise ValueError(f"num_workers={self.config.num_workers} cannot resume a state of {streams} streams per "
                             f"rank: use num_workers in {options}")
        self._set_streams(streams)
        self._batches = int(state["batches"])
        self._cursors = [Cursor.from_list(c) for c in state["cursors"]]
        self._skips = Counter({k: int(v) for k, v in state["skip_counts"].items()})

    def load_state_dicts(self, states: list[dict]) -> str:
        """Go on from the saved states of *every* rank of a run with another world size (or stream count):
        the groups they had left of their epochs are dealt to this run's streams (data.plan.replan), so no
        sample of the interrupted epochs is skipped or repeated; the order of samples is a new one, unless
        the total number of streams is unchanged and divides evenly, which keeps every stream as it was
        (each reads next what it would have; a rank's round of its streams starts again at its first).
        Skip counts go on per rank: rank r continues old rank r's (those of old ranks beyond the new world
        size are not carried). Returns a line for the log saying what was carried over."""
        for state in states:
            self._check_state(state)
        old_world = len(states)
        ranks = sorted((int(s["rank"]), int(s["world_size"]), int(s["streams_per_rank"])) for s in states)
        if [r for r, _, _ in ranks] != list(range(old_world)) or {w for _, w, _ in ranks} != {old_world} or \
                len({k for _, _, k in ranks}) != 1:
            raise ValueError(f"load_state_dicts needs the states of every rank of one run, each once: got (rank, "
                             f"world_size, streams_per_rank) = {ranks}")
        old_streams = ranks[0][2]
        cursors = [Cursor.from_list(c) for s in sorted(states, key=lambda s: int(s["rank"])) for c in s["cursors"]]
        old = ShardPlan(len(self.urls), self.config.seed, old_world, old_streams, self.config.shards_per_group)
        streams = self.config.streams_per_rank or max(1, self.config.num_workers)
        keep = old.num_streams // self.world_size
        if self.config.streams_per_rank in (None, keep) and keep * self.world_size == old.num_streams \
                and keep % max(1, self.config.num_workers) == 0:
            streams = keep  # the same streams, each going on where it was
        self._set_streams(streams)
        planned = replan(old, cursors, self.plan)
        self._cursors = planned[self.rank * streams:(self.rank + 1) * streams]
        # The skip counts are per rank (rank 0's are logged): rank r goes on from old rank r's.
        by_rank = {int(s["rank"]): s for s in states}
        saved = by_rank[self.rank]["skip_counts"] if self.rank < old_world else {}
        self._skips = Counter({k: int(v) for k, v in saved.items()})
        if old.num_streams == self.plan.num_streams:
            return (f"data: {old_world} ranks x {old_streams} streams -> {self.world_size} x {streams}: every stream "
                    "goes on where it was")
        carried = [c for cursor in planned for c in cursor.carried]
        epochs = sorted({c.epoch for c in carried})
        return (f"data: {old_world} ranks x {old_streams} streams -> {self.world_size} x {streams}: "
                f"{len(carried)} unfinished shard groups of epoch(s) {epochs} dealt to the new streams, "
                f"then epoch {planned[0].epoch}")
