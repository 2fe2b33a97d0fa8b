"""The SD v1 model card's evaluation: FID and CLIP score (ViT-L/14) over guidance scales, for one or
several checkpoints, resumable and split across ranks.

    python -m tools.evaluate CKPT [CKPT ...] --coco-captions annotations/captions_val2017.json \\
        --coco-images val2017/ --inception pt_inception-2015-12-05-6726825d.pth --clip ViT-L-14.pt \\
        --scales 1.5,2,3,4,5,6,7,8 --out eval/ [--num-prompts 10000] [--names v1-1,v1-2] [--no-ema] \\
        [--sampler plms --steps 50 --H 512 --W 512] [--batch-size 8] [--model-card] [--wandb-project P]
    torchrun --nproc_per_node 8 -m tools.evaluate ...   # the prompts of every scale split across ranks

CKPT: original .ckpt/.safetensors (released or the trainer's <run.dir>/export[/model.ckpt]) or a diffusers
folder. The defaults are the model card's protocol: 10,000 captions drawn from COCO-2017 val (see
tools/metrics/coco.py), 50 PLMS steps, 512x512, scales 1.5-8, EMA weights. Image i is generated from
caption i with seed `--seed + i` at every scale and for every checkpoint, so the comparisons are paired
and `python -m tools.sample CKPT --prompt CAPTION --seed SEED` regenerates it (captions.json lists both).

Files you provide (nothing is downloaded):
  --coco-captions  annotations/captions_val2017.json (annotations_trainval2017.zip of cocodataset.org)
  --coco-images    val2017/ (val2017.zip), the real images of the FID reference
  --inception      pt_inception-2015-12-05-6726825d.pth, the standard FID Inception weights of pytorch-fid's
                   release (github.com/mseitzer/pytorch-fid/releases/download/fid_weights/...); torch-fidelity,
                   pytorch-fid and clean-fid fetch it at run time, so copy it from a machine that has it
                   (~/.cache/torch/hub/checkpoints/) anywhere and pass the path
  --clip           CLIP ViT-L/14: OpenAI's ViT-L-14.pt, or open_clip_pytorch_model.bin of
                   timm/vit_large_patch14_clip_224.openai (QuickGELU is on by default, as those weights need)

Metrics (tools/metrics): FID of the generated PNGs against the real images behind the drawn captions
(centre-cropped and resized to the generated size, then pytorch-fid's preprocessing); its reference
statistics are computed once per (images, size, Inception weights) and cached under --cache-dir, or
given precomputed (pytorch-fid .npz) with --ref-stats. CLIP score: mean cosine of image and caption.

Ranks (torchrun or any launcher setting RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; NCCL on CUDA, gloo on
CPU) share the work of every scale and gather the features on rank 0; OUT and the COCO images must be on
a filesystem all of them see.

Resumable: every image is written atomically under OUT/<name>/scale_<s>/, and a run skips the images
already there, so a killed evaluation continues where it stopped; finished (checkpoint, scale) metrics
are kept in metrics.json next to them. OUT/eval.json pins the settings that decide the images: once OUT
holds images, a run with different ones refuses to mix them into the same folder (settings no
checkpoint can sample with are refused before anything is written). A larger --num-prompts extends a finished
sweep (the draw for N is a prefix of the draw for more).

Outputs, in OUT: results.csv / results.json (checkpoint, scale, FID, CLIP score, ...), grids/<name>.png
(a row per scale, the first prompts), pareto.png (FID against CLIP score, as the model card's figure),
and with --wandb-project a W&B run holding them.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models.adapters.keys import KeyMismatchError
from models.device import usable_device
from tools.metrics.clip_score import DEFAULT_ARCH as CLIP_ARCH
from tools.metrics.clip_score import load_clip
from tools.metrics.coco import Caption, draw_captions, reference_files
from tools.metrics.features import image_features
from tools.metrics.fid import FeatureStats, feature_statistics, frechet_distance
from tools.metrics.inception import file_sha256, load_fid_inception
from tools.sample import (SamplingConfig, add_sampling_args, checkpoint_arch, checkpoint_config, load_sampling_models,
                          resolve_checkpoint, sampling_config, save_png, txt2img)
from tools.sweep import (WandbConfig, add_wandb_args, image_grid, log_wandb, plot_fid_vs_clip, summarise,
                         wandb_config, write_results)

MODEL_CARD_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
# Names that say nothing about which checkpoint it is: the folders above are used instead.
GENERIC_NAMES = {"model", "export", "last", "checkpoint", "ckpt"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-repro" / "fid"


@dataclass(frozen=True)
class EvalConfig:
    checkpoints: tuple[str, ...]
    out: Path
    coco_captions: Path
    inception: Path
    clip: Path
    coco_images: Path | None = None  # val2017/, for the reference statistics ...
    ref_stats: Path | None = None  # ... or precomputed ones (pytorch-fid .npz with mu, sigma)
    scales: tuple[float, ...] = MODEL_CARD_SCALES
    num_prompts: int = 10_000
    caption_seed: int = 0
    seed: int = 0  # image i uses seed + i
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    arch: str | None = None  # None: a trainer export's own (its export.json), else sd-v1
    ema: bool | None = None  # None: EMA weights when a checkpoint has both copies
    names: tuple[str, ...] = ()
    batch_size: int = 8
    metric_batch_size: int = 50
    num_workers: int = 0
    ref_size: int | None = None  # side of the square real images; None: the generated height
    clip_arch: str = CLIP_ARCH
    clip_quick_gelu: bool = True
    cache_dir: Path | None = None
    grid_columns: int = 8
    model_card: bool = False
    wandb: WandbConfig | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint")
        if not self.scales or len(set(self.scales)) != len(self.scales) or min(self.scales) < 0:
            raise ValueError(f"--scales {list(self.scales)}: give distinct guidance scales >= 0")
        if self.num_prompts < 2:
            raise ValueError(f"--num-prompts {self.num_prompts}: FID needs at least 2 images")
        if self.coco_images is None and self.ref_stats is None:
            raise ValueError("FID needs the real images: pass --coco-images (the val2017/ folder) or --ref-stats")
        if self.names and len(self.names) != len(self.checkpoints):
            raise ValueError(f"--names has {len(self.names)} names for {len(self.checkpoints)} checkpoints")
        if min(self.batch_size, self.metric_batch_size, self.grid_columns) < 1 or self.num_workers < 0:
            raise ValueError("--batch-size, --metric-batch-size and --grid-columns must be >= 1, --num-workers >= 0")
        usable_device(self.device)
        names = self.checkpoint_names()
        if len(set(names)) != len(names):
            raise ValueError(f"checkpoints {list(self.checkpoints)} get the same names {names}: pass --names")
        bad = [n for n in names if not n or "/" in n or n.startswith(".") or n in ("grids", "cache")]
        if bad:
            raise ValueError(f"--names {bad}: a name becomes a folder; use letters, digits, '-', '_' or '.'")

    def checkpoint_names(self) -> list[str]:
        return list(self.names) if self.names else [_default_name(Path(c)) for c in self.checkpoints]

    def protocol(self) -> dict:
        """What decides the images (not N: a larger draw extends a smaller one)."""
        sampling = {k: v for k, v in asdict(self.sampling).items() if k != "scale"}  # scales are swept
        # The architecture is each checkpoint's (prepare_out's checkpoint_entry), not the run's.
        return {"sampling": sampling, "seed": self.seed, "caption_seed": self.caption_seed, "ema": self.ema}


def _default_name(path: Path) -> str:
    """The file's stem or the folder's name; a generic one (the trainer's export/model.ckpt) is replaced by
    the first folder above it with a telling name (run/v1-2/export/model.ckpt -> v1-2); a checkpoint's export
    (checkpoint.export) is named with its stage and step (run/v1-2/exports/step-5000 -> v1-2-step-5000)."""
    name = path.stem if path.suffix in (".ckpt", ".safetensors", ".pt", ".pth") else path.name
    while name in GENERIC_NAMES and path.parent != path:
        path = path.parent
        name = path.name
    if name.startswith("step-") and path.parent.name == "exports":
        name = f"{path.parent.parent.name}-{name}"
    return name


@dataclass
class Dist:
    """This process's place among the ranks; single-process when WORLD_SIZE is unset or 1."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            # Long timeout: ranks wait at barriers while others finish their share of a scale.
            dist.init_process_group(backend, timeout=timedelta(hours=3))
        return cls(dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def run_on_rank0(self, fn):
        """fn() on rank 0; its ValueError/FileNotFoundError raised on every rank (no rank left waiting)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except (ValueError, FileNotFoundError) as err:
                if self.world == 1:
                    raise
                error = err
        message = self.broadcast(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise ValueError(f"rank 0: {message}")
        return self.broadcast(result)


def image_dir(out: Path, name: str, scale: float) -> Path:
    return out / name / f"scale_{scale:g}"


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def missing_indices(folder: Path, n: int) -> list[int]:
    return [i for i in range(n) if not image_path(folder, i).is_file()]


def _log(d: Dist, msg: str) -> None:
    if d.rank == 0:
        print(msg, file=sys.stderr, flush=True)


def checkpoint_entry(checkpoint: Path, cfg: EvalConfig) -> dict:
    """What a checkpoint's images come from: its file, which UNet copy, and the architecture built for it
    (a trainer export's own unless --arch; a diffusers folder carries its config: None)."""
    path = resolve_checkpoint(checkpoint)
    return {"path": str(path.resolve()), "ema": cfg.ema,
            "arch": None if path.is_dir() else checkpoint_arch(path, cfg.arch)}


def _has_images(out: Path, name: str) -> bool:
    """Whether OUT/<name> (any name: "*") holds a generated image."""
    return any(out.glob(f"{name}/scale_*/*.png"))


def prepare_out(cfg: EvalConfig, captions: list[Caption]) -> None:
    """Write (or check against) OUT/eval.json and OUT/captions.json."""
    for c in cfg.checkpoints:  # settings a checkpoint cannot sample with must not be pinned in eval.json
        cfg.sampling.check_model(checkpoint_config(c, cfg.arch))
    cfg.out.mkdir(parents=True, exist_ok=True)
    meta_path, captions_path = cfg.out / "eval.json", cfg.out / "captions.json"
    checkpoints = {n: checkpoint_entry(c, cfg) for n, c in zip(cfg.checkpoint_names(), cfg.checkpoints)}
    listed = [{**c.to_json(), "seed": cfg.seed + c.index} for c in captions]
    # eval.json binds only once images were made under it: a run that stopped before its first image (a
    # checkpoint that failed to load, say) must not lock the folder to its settings.
    if meta_path.is_file() and _has_images(cfg.out, "*"):
        meta = json.loads(meta_path.read_text())
        if meta["protocol"] != json.loads(json.dumps(cfg.protocol())):
            raise ValueError(f"{cfg.out} holds images made with other settings ({meta['protocol']}); "
                             f"these are {cfg.protocol()}: use another --out, or the same settings")
        for name, entry in checkpoints.items():
            old = meta["checkpoints"].get(name)
            if old is not None and old != entry and _has_images(cfg.out, name):
                raise ValueError(f"{cfg.out}/{name} holds images of {old}, not {entry}: pass another name (--names)")
        old_captions = json.loads(captions_path.read_text()) if captions_path.is_file() else []
        common = min(len(old_captions), len(listed))
        if old_captions[:common] != listed[:common]:
            raise ValueError(f"{cfg.out} was made from another caption draw (other --coco-captions file or seed)")
        checkpoints = {**meta["checkpoints"], **checkpoints}
        if len(old_captions) > len(listed):
            listed = old_captions
    meta_path.write_text(json.dumps({"protocol": cfg.protocol(), "checkpoints": checkpoints}, indent=2) + "\n")
    captions_path.write_text(json.dumps(listed, indent=1) + "\n")


def generate(cfg: EvalConfig, captions: list[Caption], d: Dist, device: str) -> None:
    """Every missing image of every (checkpoint, scale); the missing ones split round-robin over ranks."""
    n = cfg.num_prompts
    for name, ckpt in zip(cfg.checkpoint_names(), cfg.checkpoints):
        dirs = {s: image_dir(cfg.out, name, s) for s in cfg.scales}
        missing = d.broadcast({s: missing_indices(dirs[s], n) for s in cfg.scales} if d.rank == 0 else None)
        if not any(missing.values()):
            continue
        models = load_sampling_models(ckpt, cfg.arch, cfg.ema, device, sampling=cfg.sampling)
        _log(d, f"{name}: {models.weights}")
        if d.rank == 0:
            (cfg.out / name).mkdir(parents=True, exist_ok=True)
            (cfg.out / name / "checkpoint.json").write_text(json.dumps({"weights": models.weights}) + "\n")
        for s in cfg.scales:
            mine = missing[s][d.rank::d.world]
            _log(d, f"{name} scale {s:g}: {len(missing[s])} of {n} images to make ({d.world} ranks)")
            starts = range(0, len(mine), cfg.batch_size)
            for k, start in enumerate(starts):
                batch = mine[start:start + cfg.batch_size]
                images = txt2img(models, [captions[i].caption for i in batch], [cfg.seed + i for i in batch],
                                 cfg.sampling, scale=s)
                for i, image in zip(batch, images):
                    save_png(image_path(dirs[s], i), image.numpy())
                if (k + 1) % max(1, len(starts) // 10) == 0 and k + 1 < len(starts):
                    _log(d, f"{name} scale {s:g}: rank 0 made {start + len(batch)} of its {len(mine)}")
        del models
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        d.barrier()


def _gather_in_order(d: Dist, n: int, mine: list[int], values: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Per-image arrays of all ranks, in image order, on rank 0 (None elsewhere)."""
    parts = d.gather((mine, values))
    if d.rank != 0:
        return None
    out = {}
    for key in values:
        first = next(v[key] for _, v in parts if len(v[key]))
        full = np.empty((n, *first.shape[1:]), dtype=first.dtype)
        for idx, v in parts:
            full[idx] = v[key]
        out[key] = full
    return out


def reference_statistics(cfg: EvalConfig, captions: list[Caption], inception, inception_sha: str, d: Dist,
                         device_batch: int) -> FeatureStats | None:
    """Rank 0 gets the real images' statistics: given, cached, or computed now (split over ranks) and cached."""
    if cfg.ref_stats is not None:
        return FeatureStats.load(cfg.ref_stats) if d.rank == 0 else None
    files = reference_files(captions, cfg.coco_images)
    size = cfg.ref_size or cfg.sampling.height
    key = {"folder": str(Path(cfg.coco_images).resolve()), "images": [f.name for f in files],
           "bytes": sum(f.stat().st_size for f in files), "size": size, "inception_sha256": inception_sha,
           "preprocess": "RGB, centre square, PIL bicubic to size, uint8; pytorch-fid: /255, bilinear 299, 2x-1"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = (cfg.cache_dir or default_cache_dir()) / f"coco_ref_{len(files)}_{size}px_{digest}.npz"
    # Rank 0 decides: a cache on a node-local disk must not send the ranks down different paths.
    if d.broadcast(cache.is_file() if d.rank == 0 else None):
        _log(d, f"reference statistics: {cache} (cached)")
        return FeatureStats.load(cache) if d.rank == 0 else None
    _log(d, f"reference statistics of {len(files)} real images -> {cache}")
    mine = list(range(len(files)))[d.rank::d.world]
    feats = image_features([files[i] for i in mine], inception, resize=size, batch_size=device_batch,
                           num_workers=cfg.num_workers)
    full = _gather_in_order(d, len(files), mine, feats)
    if d.rank != 0:
        return None
    stats = feature_statistics(full["inception"], meta={**key, "images": len(files)})  # a count: the npz stays small
    stats.save(cache)
    return stats


def metric_key(cfg: EvalConfig, inception_sha: str) -> dict:
    clip = Path(cfg.clip)
    st = clip.stat()
    reference = (str(Path(cfg.ref_stats).resolve()) if cfg.ref_stats else
                 {"coco_images": str(Path(cfg.coco_images).resolve()), "size": cfg.ref_size or cfg.sampling.height})
    return {"num_images": cfg.num_prompts, "inception_sha256": inception_sha, "reference": reference,
            "clip": {"path": str(clip.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "arch": cfg.clip_arch, "quick_gelu": cfg.clip_quick_gelu}}


def measure(cfg: EvalConfig, captions: list[Caption], d: Dist, device: str) -> None:
    """metrics.json for every (checkpoint, scale) whose images are complete and whose metrics are not."""
    inception_sha = file_sha256(cfg.inception)
    key = metric_key(cfg, inception_sha)

    def todo_list():
        todo = []
        for name in cfg.checkpoint_names():
            for s in cfg.scales:
                path = image_dir(cfg.out, name, s) / "metrics.json"
                if not path.is_file() or json.loads(path.read_text()).get("key") != json.loads(json.dumps(key)):
                    todo.append((name, s))
        return todo

    todo = d.broadcast(todo_list() if d.rank == 0 else None)
    if not todo:
        return
    inception, _ = load_fid_inception(cfg.inception, device, sha256=inception_sha)
    clip = load_clip(cfg.clip, cfg.clip_arch, cfg.clip_quick_gelu, device)
    reference = reference_statistics(cfg, captions, inception, inception_sha, d, cfg.metric_batch_size)
    n = cfg.num_prompts
    mine = list(range(n))[d.rank::d.world]
    for name, s in todo:
        folder = image_dir(cfg.out, name, s)
        feats = image_features([image_path(folder, i) for i in mine], inception, clip,
                               [captions[i].caption for i in mine], batch_size=cfg.metric_batch_size,
                               num_workers=cfg.num_workers)
        full = _gather_in_order(d, n, mine, feats)
        if d.rank == 0:
            fid = frechet_distance(reference, full["inception"])
            clip_scores = full["clip"]
            result = {"fid": fid, "clip_score": float(clip_scores.mean()), "clip_score_std": float(clip_scores.std()),
                      "num_images": n, "key": key}
            (folder / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            _log(d, f"{name} scale {s:g}: FID {fid:.3f}, CLIP score {result['clip_score']:.4f}")
    del inception, clip
    d.barrier()


def report(cfg: EvalConfig) -> tuple[list[dict], dict[str, Path]]:
    """results.csv/json, grids, the plot and W&B, from the metrics.json files (rank 0)."""
    meta = json.loads((cfg.out / "eval.json").read_text())
    rows = []
    for name in cfg.checkpoint_names():
        info = cfg.out / name / "checkpoint.json"
        weights = json.loads(info.read_text())["weights"] if info.is_file() else ""
        for s in cfg.scales:
            m = json.loads((image_dir(cfg.out, name, s) / "metrics.json").read_text())
            rows.append({"checkpoint": name, "scale": s, "fid": m["fid"], "clip_score": m["clip_score"],
                         "num_images": m["num_images"], "weights": weights,
                         "path": meta["checkpoints"][name]["path"], "sampler": cfg.sampling.sampler,
                         "steps": cfg.sampling.steps, "eta": cfg.sampling.eta, "height": cfg.sampling.height,
                         "width": cfg.sampling.width, "seed": cfg.seed, "caption_seed": cfg.caption_seed})
    protocol = {**cfg.protocol(), "num_prompts": cfg.num_prompts, "coco_captions": str(cfg.coco_captions),
                "clip_arch": cfg.clip_arch, "clip_quick_gelu": cfg.clip_quick_gelu,
                "inception": str(cfg.inception), "fid": "pytorch-fid (pool_3, bilinear 299), float64 Frechet"}
    write_results(rows, cfg.out, protocol)
    grids = {}
    columns = list(range(min(cfg.grid_columns, cfg.num_prompts)))
    for name in cfg.checkpoint_names():
        grid = image_grid([[image_path(image_dir(cfg.out, name, s), i) for i in columns] for s in cfg.scales],
                          [f"scale {s:g}" for s in cfg.scales], thumb=min(256, cfg.sampling.height))
        grids[name] = cfg.out / "grids" / f"{name}.png"
        save_png(grids[name], np.asarray(grid))
    plot = plot_fid_vs_clip(rows, cfg.out / "pareto.png", model_card=cfg.model_card)
    if cfg.wandb is not None:
        print(f"W&B run: {log_wandb(cfg.wandb, rows, protocol, plot, grids)}", file=sys.stderr)
    return rows, grids


def evaluate(cfg: EvalConfig, d: Dist | None = None) -> list[dict]:
    """The whole sweep; returns the result rows (on every rank)."""
    device = cfg.device
    d = d or Dist.from_env(device)
    if device.startswith("cuda") and d.world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', d.rank))}"
        torch.cuda.set_device(device)
    captions = d.run_on_rank0(lambda: draw_captions(cfg.coco_captions, cfg.num_prompts, cfg.caption_seed))
    d.run_on_rank0(lambda: prepare_out(cfg, captions))
    generate(cfg, captions, d, device)
    measure(cfg, captions, d, device)
    rows = d.run_on_rank0(lambda: report(cfg)[0])
    _log(d, summarise(rows))
    return rows


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 1.5,2,3") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="original .ckpt/.safetensors, trainer export or diffusers folder")
    parser.add_argument("--coco-captions", type=Path, required=True, help="annotations/captions_val2017.json")
    parser.add_argument("--coco-images", type=Path, help="the val2017/ image folder (for the reference statistics)")
    parser.add_argument("--ref-stats", type=Path, help="precomputed reference statistics (.npz with mu, sigma)")
    parser.add_argument("--inception", type=Path, required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--clip", type=Path, required=True, help="CLIP ViT-L/14 weights (OpenAI .pt or open_clip)")
    parser.add_argument("--clip-arch", default=CLIP_ARCH,
                        help="open_clip architecture of --clip: a config name or a config .json file")
    parser.add_argument("--no-clip-quick-gelu", dest="clip_quick_gelu", action="store_false",
                        help="GELU instead of QuickGELU (LAION-trained weights; OpenAI's need QuickGELU)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scales", type=_floats, default=MODEL_CARD_SCALES, help="guidance scales, e.g. 1.5,2,3")
    parser.add_argument("--num-prompts", type=int, default=10_000)
    parser.add_argument("--caption-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--names", type=lambda s: tuple(s.split(",")), default=(),
                        help="comma-separated display names, one per checkpoint")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampling batch, per rank")
    parser.add_argument("--metric-batch-size", type=int, default=50)
    parser.add_argument("--num-workers", type=int, default=4, help="image-decoding workers for the metrics")
    parser.add_argument("--ref-size", type=int, help="side of the resized real images (default: --H)")
    parser.add_argument("--cache-dir", type=Path, help=f"reference statistics cache (default {default_cache_dir()})")
    parser.add_argument("--grid-columns", type=int, default=8, help="prompts per row of the grids")
    parser.add_argument("--model-card", action="store_true", help="mark the model card's best points on the plot")
    add_sampling_args(parser, scale=False)
    add_wandb_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = EvalConfig(
            checkpoints=tuple(args.checkpoints), out=args.out, coco_captions=args.coco_captions,
            inception=args.inception, clip=args.clip, coco_images=args.coco_images, ref_stats=args.ref_stats,
            scales=args.scales, num_prompts=args.num_prompts, caption_seed=args.caption_seed, seed=args.seed,
            sampling=sampling_config(args), arch=args.arch, ema=args.ema, names=args.names,
            batch_size=args.batch_size, metric_batch_size=args.metric_batch_size, num_workers=args.num_workers,
            ref_size=args.ref_size, clip_arch=args.clip_arch, clip_quick_gelu=args.clip_quick_gelu,
            cache_dir=args.cache_dir, grid_columns=args.grid_columns, model_card=args.model_card,
            wandb=wandb_config(args), device=args.device)
    except ValueError as err:
        parser.error(str(err))
    try:
        evaluate(cfg)
    except (ValueError, FileNotFoundError, KeyMismatchError) as err:  # wrong inputs: say what, without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
