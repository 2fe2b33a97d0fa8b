"""Encode image shards once with the frozen VAE (and optionally the frozen text encoder).

SD v1 never trains the VAE or the text encoder, so every epoch re-encodes the same crops. Doing it
once turns the per-step cost into reading a float16 latent (and context). The output is one latent
shard per image shard, same name and keys, in the format of `data.latent_format`: the posterior's
mean and std (not a sample, so each epoch still draws fresh noise), the caption (the loader still
applies caption dropout), the json, optionally the CLIP context of the caption, and CLIP("") as
the shard's `__uncond__` context whenever contexts are stored.

Images are cropped exactly as the loader would (`data.transforms.decode_resize_crop`, centre crop):
precomputed latents fix the crop, so a run that wants random crops must read the image shards.

Resuming: each output shard is written under a temporary name and renamed when complete, and
existing outputs are skipped, so re-running the same command finishes an interrupted job. To split
the work over several GPUs or nodes, give each one `part=(index, count)`: it takes every count-th
input shard starting at index.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.device import usable_device

from .inputs import expand_inputs
from .latent_format import CONTEXT_SHAPE, LATENT_CHANNELS, LatentShardWriter
from .samples import CORRUPT_IMAGE, IMAGE_EXTS, NO_CAPTION, NO_IMAGE, caption_and_meta
from .shard_io import iter_shard_samples
from .transforms import decode_resize_crop, to_pixels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Samples not written are counted under the loader's reasons (data/samples.py: no_image, no_caption,
# corrupt_image), as they are the samples the loader would not take from the images; the shard-level
# reasons come from data.shard_io.


@dataclass(frozen=True)
class PrecomputeConfig:
    resolution: int = 256
    batch_size: int = 32
    # Encode captions too. Needs a CLIP ViT-L/14-width encoder: the format stores [77, 768].
    text: bool = True
    device: str = "cpu"
    # float32 is the reference. bfloat16 encodes under bf16 autocast (float32 weights; convolutions and
    # matmuls in bf16, GroupNorm in float32), exactly as the trainer's loop encodes images at
    # parallel.precision=bf16, so latents made so are the ones a bf16 run would make itself; on GPUs it
    # about doubles throughput (tensor cores at twice TF32's rate). No float16: SD's VAE overflows in it at 512 px.
    dtype: str = "float32"
    # Threads decoding JPEGs (PIL releases the GIL while decoding).
    decode_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    part: tuple[int, int] = (0, 1)  # (index, count): this worker's slice of the input shards

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution={self.resolution}: must be a positive multiple of 8 (the VAE downsamples by 8)")
        if self.batch_size < 1 or self.decode_workers < 1:
            raise ValueError("batch_size and decode_workers must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose {' or '.join(DTYPES)}")
        usable_device(self.device)
        index, count = self.part
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"part={self.part}: need 0 <= index < count")


@dataclass
class PrecomputeReport:
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)  # already complete from an earlier run
    samples_in: int = 0
    samples_written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> samples not written
    # data.shard_io's shard-level reasons (unreadable, truncated, empty) -> shards
    shard_problems: dict[str, int] = field(default_factory=dict)
    with_text: bool = False
    resolution: int = 0
    latent_size: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> str:
        rate = self.samples_written / self.elapsed_s if self.elapsed_s else 0.0
        lines = [f"{len(self.shards_written)} shards written ({len(self.shards_skipped)} already done), "
                 f"{self.samples_written}/{self.samples_in} samples, latents {LATENT_CHANNELS}x{self.latent_size}x"
                 f"{self.latent_size}{' + text contexts' if self.with_text else ''}, {rate:.1f} samples/s"]
        lines += [f"  dropped {count:>7}  {reason}" for reason, count in sorted(self.dropped.items())]
        lines += [f"  shards  {count:>7}  {reason}" for reason, count in sorted(self.shard_problems.items())]
        return "\n".join(lines)


def list_shards(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard files from paths, folders (their *.tar) and brace patterns (data/inputs.py)."""
    shards = expand_inputs(inputs, ".tar", "shard")
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("input shards share file names; outputs are named after inputs, so give one folder per run")
    return shards


def part_from_env(environ=os.environ) -> tuple[int, int]:
    """(index, count) of this process among its launcher's: torchrun's RANK / WORLD_SIZE, else srun's
    SLURM_PROCID / SLURM_NTASKS (one task per GPU: `python -m launch` submits precompute jobs so)."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in environ and world in environ:
            return int(environ[rank]), int(environ[world])
    raise ValueError("--part env: neither RANK/WORLD_SIZE (torchrun) nor SLURM_PROCID/SLURM_NTASKS (srun) is set; "
                     "give --part I/N")


def local_device(device: str, environ=os.environ) -> str:
    """"cuda" alone, in one of several processes on a node, is that process's GPU (LOCAL_RANK, else
    SLURM_LOCALID), unless the launcher left it one GPU to see (then that one)."""
    local = environ.get("LOCAL_RANK", environ.get("SLURM_LOCALID"))
    if device != "cuda" or local is None:
        return device
    visible = torch.cuda.device_count()
    if visible <= 1:
        return device
    if int(local) >= visible:
        raise ValueError(f"process {local} on this node sees only {visible} GPUs: start one process per GPU")
    return f"cuda:{int(local)}"


def load_models(checkpoint: str | os.PathLike | None, arch: str = "sd-v1", seed: int = 0,
                vae: str | os.PathLike | None = None, text_encoder: str | os.PathLike | None = None):
    """(vae, text_encoder) from an original SD v1 checkpoint, or from `vae` (and `text_encoder`) on their
    own (models/pretrained_parts.py), or random ones when none is given (smoke tests: the latents are then
    meaningless); a part not given is random."""
    from models.adapters.keys import load_strict
    from models.configs import sd_v1, tiny
    from models.pretrained_parts import text_encoder_state_dict, vae_state_dict
    from models.stable_diffusion import build_models, load_ldm_checkpoint

    configs = {"sd-v1": sd_v1, "tiny": tiny}
    if arch not in configs:
        raise ValueError(f"arch={arch!r}: choose {' or '.join(configs)}")
    if checkpoint is None:
        torch.manual_seed(seed)
        cfg = configs[arch]()
        models = build_models(cfg)
        if vae is not None:
            load_strict(models.vae, vae_state_dict(vae, cfg.vae), "VAE")
        if text_encoder is not None:
            load_strict(models.text_encoder, text_encoder_state_dict(text_encoder, cfg.text), "text encoder")
    else:
        models = load_ldm_checkpoint(checkpoint, configs[arch]())
    # Only the frozen parts are needed; let the UNet go now.
    models.unet = None
    return models.vae.eval(), models.text_encoder.eval()


def _decode(data: bytes, resolution: int) -> np.ndarray | None:
    try:
        return decode_resize_crop(data, resolution, crop="center")
    except Exception:  # PIL raises many types on bad data (OSError, SyntaxError, ValueError, ...)
        return None


class _Encoder:
    def __init__(self, vae, text_encoder, tokenizer, config: PrecomputeConfig):
        self.config = config
        self.device = torch.device(config.device)
        dtype = DTYPES[config.dtype]
        # Weights stay float32 whatever the dtype: bfloat16 is autocast, as in the training loop.
        self.autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext())
        self.vae = vae.to(self.device).eval()
        self.text_encoder = self.tokenizer = self.uncond = None
        if config.text:
            if text_encoder is None or tokenizer is None:
                raise ValueError("text=True needs a text encoder and a tokenizer (or set text=False)")
            width = text_encoder.cfg.hidden_size
            context_length = text_encoder.cfg.max_position_embeddings
            if (context_length, width) != CONTEXT_SHAPE:
                raise ValueError(f"the latent format stores [{CONTEXT_SHAPE[0]}, {CONTEXT_SHAPE[1]}] text contexts "
                                 f"(CLIP ViT-L/14) but this text encoder gives [{context_length}, {width}]; "
                                 "precompute latents only (text=False / --no-text) or use the SD v1 text encoder")
            self.text_encoder, self.tokenizer = text_encoder.to(self.device).eval(), tokenizer
            self.uncond = self.encode_text([""])[0]

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, context_length=self.text_encoder.cfg.max_position_embeddings)
        with self.autocast:
            return self.text_encoder(ids.to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_images(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast:
            posterior = self.vae.encode(to_pixels(images).to(self.device))
        return posterior.mean.float().cpu(), posterior.std.float().cpu()


@dataclass
class _Prepared:
    """One batch, decoded and cropped on the CPU, ready for the encoders."""

    rows: list[tuple[str, np.ndarray, str, dict]]  # key, image, caption, metadata
    read: int  # samples it came from
    dropped: Counter


def _prepare(pending: list[tuple[str, dict[str, bytes]]], resolution: int, pool: ThreadPoolExecutor) -> _Prepared:
    """The samples the loader would read from these (data/samples.py: an image, a caption from the .txt,
    the json as it parses), decoded; checked in the loader's order, so that the counts agree with the loader's."""
    out = _Prepared([], len(pending), Counter())
    kept = []
    for key, sample in pending:
        data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
        caption, meta = caption_and_meta(sample)
        if data is None:
            out.dropped[NO_IMAGE] += 1
        elif caption is None:
            out.dropped[NO_CAPTION] += 1
        else:
            kept.append((key, data, caption, meta))
    decoded = pool.map(lambda row: _decode(row[1], resolution), kept)
    for (key, _, caption, meta), image in zip(kept, decoded):
        if image is None:
            out.dropped[CORRUPT_IMAGE] += 1
        else:
            out.rows.append((key, image, caption, meta))
    return out


def _batches(samples, size: int, report: PrecomputeReport):
    pending: list[tuple[str, dict[str, bytes]]] = []
    for _, key, sample in samples:
        report.samples_in += 1
        pending.append((key, sample))
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


def _encode_shard(src: Path, tmp: Path, enc: _Encoder, pool: ThreadPoolExecutor, ahead: ThreadPoolExecutor,
                  report: PrecomputeReport, dropped: Counter, shard_problems: Counter, bar) -> None:
    """Batches in order, each decoded (`ahead`'s thread, fanning out to `pool`) while the one before it
    is on the encoders: one after the other, the GPU would wait for every batch's JPEGs."""
    with LatentShardWriter(tmp, uncond_context=enc.uncond) as writer:
        def write(prepared: _Prepared) -> None:
            dropped.update(prepared.dropped)
            rows = prepared.rows
            if rows:
                means, stds = enc.encode_images([r[1] for r in rows])
                contexts = enc.encode_text([r[2] for r in rows]) if enc.config.text else [None] * len(rows)
                for (key, _, caption, meta), mean, std, context in zip(rows, means, stds, contexts):
                    writer.write(key, mean, std, caption, meta, context)
                report.samples_written += len(rows)
            bar.update(prepared.read)

        queued = None
        for pending in _batches(iter_shard_samples(str(src), shard_problems), enc.config.batch_size, report):
            following = ahead.submit(_prepare, pending, enc.config.resolution, pool)
            if queued is not None:
                write(queued.result())
            queued = following
        if queued is not None:
            write(queued.result())


def _expected_samples(shards: list[Path]) -> int | None:
    """Samples to encode, from img2dataset's NNNNN_stats.json beside each shard (None if any is missing)."""
    total = 0
    for shard in shards:
        stats = shard.with_name(shard.stem + "_stats.json")
        if not stats.is_file():
            return None
        try:
            total += int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError):
            return None
    return total


def precompute_shards(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, vae,
                      text_encoder=None, tokenizer=None, config: PrecomputeConfig = PrecomputeConfig(),
                      progress: bool = True) -> PrecomputeReport:
    """Write `out_dir/<input name>` latent shards for this worker's part of `inputs` and return the
    totals; the report is also written to `<out_dir>.precompute[-i-of-n].json`."""
    from tqdm import tqdm

    start = time.monotonic()
    index, count = config.part
    shards = list_shards(inputs)[index::count]
    enc = _Encoder(vae, text_encoder, tokenizer, config)  # first: it refuses a bad setup before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PrecomputeReport(with_text=config.text, resolution=config.resolution,
                              latent_size=config.resolution // vae.cfg.downsample_factor)
    dropped: Counter[str] = Counter()
    shard_problems: Counter[str] = Counter()
    with ThreadPoolExecutor(config.decode_workers) as pool, ThreadPoolExecutor(1) as ahead, \
            tqdm(total=_expected_samples([s for s in shards if not (out_dir / s.name).is_file()]), unit="img",
                 desc="precompute", disable=not progress) as bar:
        for src in shards:
            dst = out_dir / src.name
            if dst.is_file():
                report.shards_skipped.append(str(dst))
                continue
            tmp = dst.with_name(dst.name + ".tmp")
            try:
                _encode_shard(src, tmp, enc, pool, ahead, report, dropped, shard_problems, bar)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.rename(dst)
            report.shards_written.append(str(dst))
    report.dropped, report.shard_problems = dict(dropped), dict(shard_problems)
    report.elapsed_s = time.monotonic() - start
    suffix = "" if count == 1 else f"-{index}-of-{count}"
    out_dir.with_name(f"{out_dir.name}.precompute{suffix}.json").write_text(
        json.dumps(asdict(report) | {"config": asdict(config)}, indent=2) + "\n")
    return report
