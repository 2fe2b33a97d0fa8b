"""From tar members to training samples, in two steps split by the shuffle buffer:

- `read_candidates` (before the buffer): checks that need no decoding — the sample has an image (or
  latent), a caption, metadata passing the filters. Cheap, and replayed on resume.
- `Decoder` (after the buffer): decodes and transforms one candidate with its own RNG, seeded by
  (seed, epoch, shard, index in shard), so caption dropout and random crops do not depend on the
  order samples arrive in, on the worker that decodes them, or on a resume.
Every sample that does not become a training sample is counted under a reason.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data.filters_runtime import ColumnCheck, reject_reason
from data.latent_format import CONTEXT_EXT, LATENT_EXT, UNCOND_KEY, decode_context, decode_latent, npy_shape
from data.shard_io import iter_shard_samples
from data.stages import SubsetFilter
from data.transforms import decode_resize_crop

NO_IMAGE = "no_image"  # no .jpg/.jpeg/.png/.webp member (or no .latent.npy in latents mode)
NO_CAPTION = "no_caption"  # no .txt member, or an empty / whitespace-only one
CORRUPT_IMAGE = "corrupt_image"  # PIL cannot decode it (corrupt or truncated JPEG, not an image, ...)
BAD_LATENT = "bad_latent"  # .latent.npy that does not load or has the wrong shape for the resolution
NO_CONTEXT = "no_context"  # contexts requested, but the sample has no (valid) .ctx.npy
NO_UNCOND = "no_uncond_context"  # contexts requested, but the shard has no __uncond__.ctx.npy
RESUME_INEXACT = "resume_inexact"  # the data changed since the state was saved; see plan.stream_items

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(slots=True)
class Candidate:
    shard: int
    index: int  # sample position in the shard's tar
    key: str
    caption: str
    meta: dict
    payload: bytes  # encoded image, or the .latent.npy bytes
    context: bytes | None = None
    uncond: bytes | None = None


def caption_and_meta(members: dict[str, bytes]) -> tuple[str | None, dict]:
    """A sample's caption (its .txt, stripped; None when there is none or it is blank: the sample is then
    skipped as no_caption) and metadata (its .json; {} when there is none or it does not parse: a filter
    that needs a field then drops the sample, counted under its reason). One rule for the loader and for
    data/precompute.py, so image shards and the latent shards made from them give the same samples."""
    text = members.get("txt")
    caption = text.decode("utf-8", errors="replace").strip() if text is not None else ""
    return caption or None, _parse_meta(members.get("json"))


def _parse_meta(data: bytes | None) -> dict:
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


class WrongShardKind(ValueError):
    """A shard of images read as latents, of latents read as images, or of latents made at another
    resolution: a setting, not bad data."""


class _ShardKind:
    """What a shard's samples hold against what the loader reads (`latents`, at `latent_size`)."""

    def __init__(self, latents: bool, latent_size: int | None, setting: str = "stage.data.shards"):
        self.latents, self.latent_size, self.setting = latents, latent_size, setting  # `setting`: for the message
        self.wanted = self.other_kind = 0  # samples with the payload the mode reads / only the other mode's
        self.sizes: Counter = Counter()  # latent sizes seen (from the .npy headers: nothing is decoded)

    def payload(self, members: dict[str, bytes]) -> bytes | None:
        """The sample's image (or latent) bytes, None if it has none; notes which kind it holds."""
        images = [e for e in IMAGE_EXTS if e in members]
        payload = members.get(LATENT_EXT) if self.latents else members[images[0]] if images else None
        if payload is None:
            self.other_kind += bool(images) if self.latents else LATENT_EXT in members
            return None
        self.wanted += 1
        if self.latents and self.latent_size is not None:
            shape = npy_shape(payload)
            self.sizes[shape[-1] if shape else None] += 1
        return payload

    def check(self, url: str) -> None:
        """Raise WrongShardKind if nothing seen was of the kind (and size) the loader reads."""
        if self.latent_size is not None and self.sizes and self.latent_size not in self.sizes:
            made = max(self.sizes, key=self.sizes.get)
            raise WrongShardKind(
                f"{url}: its latents are {made}x{made} ({8 * made if made else '?'} px), this stage trains at "
                f"{8 * self.latent_size} px ({self.latent_size}x{self.latent_size}): precompute its images at "
                f"--resolution {8 * self.latent_size} (python -m data precompute), or set stage.data.resolution "
                "to match")
        if self.other_kind and not self.wanted:
            have, want = ("images", ".latent.npy latents") if self.latents else (".latent.npy latents", "images")
            raise WrongShardKind(
                f"{url}: its samples hold {have}, not {want}: " + (
                    f"point {self.setting} at latent shards (python -m data precompute) or set "
                    "stage.data.latents=false" if self.latents else
                    f"set stage.data.latents=true, or point {self.setting} at image shards"))


def check_shard_kind(url: str, latents: bool, latent_size: int | None, samples: int = 16,
                     setting: str = "stage.data.shards") -> None:
    """The loader's shard check on the first `samples` samples only: a launcher's quick look before a
    job is queued (the loader checks every shard it reads). Raises WrongShardKind, naming `setting`."""
    kind = _ShardKind(latents, latent_size, setting)
    seen = 0
    for _, key, members in iter_shard_samples(url, Counter()):
        if key.rsplit("/", 1)[-1] != UNCOND_KEY:
            kind.payload(members)
            seen += 1
            if seen == samples:
                break
    kind.check(url)


def read_candidates(url: str, shard: int, filters: SubsetFilter | None, latents: bool, context: bool,
                    counts: Counter, latent_size: int | None = None, setting: str = "stage.data.shards",
                    unreadable: list[str] | None = None) -> Iterator[Candidate]:
    """A shard's samples that pass the cheap checks. A shard of the wrong kind for `latents` (or, given
    `latent_size`, whose latents all have another size) raises WrongShardKind once it is read, and one
    whose json lacks a column the filters read in every sample raises MissingColumns
    (data/filters_runtime.py): skipping its samples one by one, the loader would read the whole dataset
    (every rank, every epoch) before it could tell that nothing will ever be usable. An unreadable shard's
    error is appended to `unreadable` (data.shard_io.iter_shard_samples)."""
    uncond = None
    kind = _ShardKind(latents, latent_size, setting)
    columns = ColumnCheck(filters) if filters is not None else None
    for index, key, members in iter_shard_samples(url, counts, unreadable):
        if key.rsplit("/", 1)[-1] == UNCOND_KEY:
            uncond = members.get(CONTEXT_EXT)
            continue
        payload = kind.payload(members)
        if payload is None:
            counts[NO_IMAGE] += 1
            continue
        caption, meta = caption_and_meta(members)
        if caption is None:
            counts[NO_CAPTION] += 1
            continue
        if filters is not None:
            columns.note(meta, "json" in members)
            reason = reject_reason(filters, meta)
            if reason is not None:
                counts[reason] += 1
                continue
        ctx = None
        if context:
            if uncond is None:
                counts[NO_UNCOND] += 1
                continue
            ctx = members.get(CONTEXT_EXT)
            if ctx is None:
                counts[NO_CONTEXT] += 1
                continue
        yield Candidate(shard, index, key, caption, meta, payload, ctx, uncond)
    kind.check(url)
    if columns is not None:
        columns.check(url)


class Decoder:
    """Candidate -> sample dict, or None (counted) when it cannot be decoded."""

    def __init__(self, seed: int, resolution: int, crop: str, caption_dropout: float, latents: bool, context: bool):
        self.seed, self.resolution, self.crop = seed, resolution, crop
        self.caption_dropout, self.latents, self.context = caption_dropout, latents, context

    def __call__(self, epoch: int, c: Candidate, counts: Counter) -> dict | None:
        rng = random.Random(f"sample/{self.seed}/{epoch}/{c.shard}/{c.index}")
        # Always drawn first, so the crop offsets do not depend on the dropout probability.
        dropped = rng.random() < self.caption_dropout
        sample = {"key": c.key, "caption": "" if dropped else c.caption, "dropped": dropped, "json": c.meta}
        if not self.latents:
            try:
                sample["image"] = decode_resize_crop(c.payload, self.resolution, self.crop, rng)
            except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                counts[CORRUPT_IMAGE] += 1
                return None
            return sample
        try:
            sample["latent_mean"], sample["latent_std"] = decode_latent(c.payload, self.resolution // 8)
        except (ValueError, OSError, EOFError):
            counts[BAD_LATENT] += 1
            return None
        if self.context:
            try:
                sample["context"] = decode_context(c.uncond if dropped else c.context)
            except (ValueError, OSError, EOFError):
                counts[NO_UNCOND if dropped else NO_CONTEXT] += 1
                return None
        return sample


def stack(samples: list[dict], name: str) -> np.ndarray:
    return np.stack([s[name] for s in samples])
