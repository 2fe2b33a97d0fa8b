r"""`python -m data {filter,download,download-env,precompute,synth}`: the data pipeline's commands.

    python -m data filter laion2B-en/ --stage laion-improved-aesthetics --out subsets/aesthetics
    python -m data download-env --path .venv-img2dataset
    python -m data download subsets/aesthetics --stage laion-improved-aesthetics --out shards/aesthetics
    python -m data precompute shards/aesthetics --checkpoint sd-v1-1.ckpt --stage laion-improved-aesthetics \
        --no-text --out latents/aesthetics
    python -m data precompute shards/aesthetics --vae kl-f8/model.ckpt --text-encoder clip-vit-large-patch14 ...
    python -m data synth --out shards/synth --shards 4 --samples-per-shard 256

Each prints a summary at the end; filter, download and precompute also write a JSON report.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from .stages import RULE_COLUMNS, STAGES, MetadataColumns, SubsetFilter, get_stage


def _optional(kind):
    """A rule value, or "none" to turn the stage's rule off."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _csv(text: str) -> tuple[str, ...] | None:
    return None if text.lower() == "none" else tuple(s.strip() for s in text.split(",") if s.strip())


def _add_column_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metadata column names (defaults: laion2B-en parquet)")
    defaults = MetadataColumns()
    for f in fields(MetadataColumns):
        g.add_argument(f"--{f.name}-col", dest=f"col_{f.name}", default=None, metavar="NAME",
                       help=f"default {getattr(defaults, f.name)!r}")


def _columns(args) -> MetadataColumns:
    return MetadataColumns(**{f.name: getattr(args, f"col_{f.name}") or getattr(MetadataColumns(), f.name)
                              for f in fields(MetadataColumns)})


def _rules(args) -> SubsetFilter:
    base = get_stage(args.stage).filter if args.stage else SubsetFilter()
    overrides = {rule: getattr(args, rule) for rule in RULE_COLUMNS if getattr(args, rule) is not _UNSET}
    return replace(base, columns=_columns(args), **overrides)


_UNSET = object()


def cmd_filter(args) -> int:
    from .filter import filter_parquet

    rules = _rules(args)
    print(f"rules: {', '.join(f'{r}={getattr(rules, r)!r}' for r in rules.active_rules()) or 'none (keep every row)'}")
    report = filter_parquet(args.inputs, args.out, rules, batch_size=args.batch_size, rows_per_file=args.rows_per_file,
                            columns=args.columns, overwrite=args.overwrite, progress=not args.no_progress)
    print(report.summary())
    print(f"report: {Path(args.out) / 'filter_report.json'}")
    return 0


def cmd_download_env(args) -> int:
    from .download import create_env

    start = time.monotonic()
    path = create_env(args.path, force=args.force, extras=args.extra)
    print(f"img2dataset environment ready: {path} ({time.monotonic() - start:.0f}s)")
    return 0


def cmd_download(args) -> int:
    from .download import DownloadConfig, download

    stage = get_stage(args.stage) if args.stage else None
    options = {name: value for name, value in (
        ("image_size", args.image_size), ("resize_mode", args.resize_mode),
        ("resize_only_if_bigger", args.resize_only_if_bigger or None), ("min_image_size", args.min_image_size),
        ("max_aspect_ratio", args.max_aspect_ratio), ("url_col", args.url_col), ("caption_col", args.caption_col),
        ("save_additional_columns", args.save_columns), ("number_sample_per_shard", args.samples_per_shard),
        ("processes_count", args.processes), ("thread_count", args.threads), ("timeout", args.timeout),
        ("retries", args.retries), ("incremental_mode", args.incremental_mode), ("distributor", args.distributor),
        ("subjob_size", args.subjob_size), ("enable_wandb", args.enable_wandb or None),
        ("encode_quality", args.encode_quality), ("spark_master", args.spark_master)) if value is not None}
    config = DownloadConfig.for_stage(stage, **options) if stage else DownloadConfig(**options)
    print(f"img2dataset: {config.image_size}px {config.resize_mode}, min side {config.min_image_size}, "
          f"{config.processes_count} processes x {config.thread_count} threads")
    report = download(args.url_list, args.out, config, env_path=args.env, report_path=args.report)
    if report is None:
        print(f"done; {args.out} is remote: run data.download.summarize on a mounted copy for the totals")
        return 0
    print(report.summary())
    out = Path(args.out).absolute()
    print(f"report: {args.report or out.with_name(out.name + '.download.json')}")
    return 0


def cmd_precompute(args) -> int:
    from models.tokenizer import CLIPTokenizer

    from .precompute import PrecomputeConfig, load_models, local_device, part_from_env, precompute_shards

    sources = [flag for flag, given in (("--checkpoint", args.checkpoint), ("--vae", args.vae), ("--random", args.random))
               if given]
    if len(sources) != 1:
        raise SystemExit("precompute: give one of --checkpoint PATH (an SD v1 checkpoint), --vae PATH [--text-encoder "
                         "DIR], or --random for randomly initialised models (smoke tests)"
                         + (f"; not {' and '.join(sources)}" if sources else ""))
    if args.text_encoder and not args.vae:
        raise SystemExit("precompute: --text-encoder goes with --vae (--checkpoint holds its own text encoder)")
    if args.vae and not args.text_encoder and not args.no_text:
        raise SystemExit("precompute: the caption contexts need the text encoder: add --text-encoder DIR, or --no-text")
    resolution = args.resolution or (get_stage(args.stage).image_size if args.stage else None)
    if resolution is None:
        raise SystemExit("precompute: give --resolution or --stage")
    if args.part == "env":
        index, count = part_from_env()
    else:
        try:
            index, count = (int(x) for x in args.part.split("/"))
        except ValueError:
            raise ValueError(f"--part {args.part}: give I/N (e.g. 3/8) or env") from None
    config = PrecomputeConfig(resolution=resolution, batch_size=args.batch_size, text=not args.no_text,
                              device=local_device(args.device), dtype=args.dtype,
                              decode_workers=args.decode_workers, part=(index, count))
    vae, text_encoder = load_models(args.checkpoint, args.arch, seed=args.seed, vae=args.vae,
                                    text_encoder=args.text_encoder)
    tokenizer = None if args.no_text else CLIPTokenizer()
    report = precompute_shards(args.inputs, args.out, vae, text_encoder, tokenizer, config, progress=not args.no_progress)
    print(report.summary())
    return 0


def cmd_synth(args) -> int:
    from .synth import write_synthetic_shards

    start = time.monotonic()
    paths = write_synthetic_shards(args.out, args.shards, args.samples_per_shard, image_size=args.image_size,
                                   seed=args.seed)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} shards x {args.samples_per_shard} samples ({args.image_size}px) in {args.out}: "
          f"{total / 2**20:.1f} MiB, {time.monotonic() - start:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stages = ", ".join(STAGES)

    p = sub.add_parser("filter", help="filter LAION parquet metadata to a stage's subset",
                       description="Stream LAION parquet files, keep the rows passing the rules, write them as "
                                   "parquet plus filter_report.json (per-rule counts). A rule flag overrides the "
                                   "stage's value; 'none' turns that rule off. Nulls fail the rule that reads them.")
    p.add_argument("inputs", nargs="+", help="parquet files or folders of them")
    p.add_argument("--out", required=True, help="output folder (NNNNN.parquet + filter_report.json)")
    p.add_argument("--stage", choices=list(STAGES), help=f"start from a preset: {stages}")
    g = p.add_argument_group("rules (override the stage's)")
    g.add_argument("--min-width", dest="min_width", type=_optional(int), default=_UNSET, help="original width >= N")
    g.add_argument("--min-height", dest="min_height", type=_optional(int), default=_UNSET, help="original height >= N")
    g.add_argument("--min-aesthetic", dest="min_aesthetic", type=_optional(float), default=_UNSET,
                   help="aesthetic score > X (strictly)")
    g.add_argument("--max-pwatermark", dest="max_pwatermark", type=_optional(float), default=_UNSET,
                   help="watermark probability < X (strictly)")
    g.add_argument("--max-punsafe", dest="max_punsafe", type=_optional(float), default=_UNSET,
                   help="NSFW probability < X (strictly)")
    g.add_argument("--min-caption-length", dest="min_caption_length", type=_optional(int), default=_UNSET,
                   help="caption >= N characters")
    g.add_argument("--max-caption-length", dest="max_caption_length", type=_optional(int), default=_UNSET,
                   help="caption <= N characters")
    g.add_argument("--languages", dest="languages", type=_csv, default=_UNSET, help="comma-separated codes, e.g. en,de")
    g.add_argument("--min-similarity", dest="min_similarity", type=_optional(float), default=_UNSET,
                   help="CLIP similarity >= X")
    _add_column_flags(p)
    p.add_argument("--columns", type=_csv, default=None, help="keep only these columns (comma-separated)")
    p.add_argument("--batch-size", type=int, default=65536, help="rows per record batch (memory)")
    p.add_argument("--rows-per-file", type=int, default=None,
                   help="roll outputs every N rows (default: one output per input)")
    p.add_argument("--overwrite", action="store_true", help="replace parquet files already in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("download-env", help="create the img2dataset virtual environment",
                       description="Create (or verify and reuse) a venv with img2dataset 1.47.0, without the "
                                   "`dataclasses` backport that breaks Python 3.11. Kept apart from the training "
                                   "venv: img2dataset needs webdataset < 0.3.")
    p.add_argument("--path", default=None, help="where (default: $SD_REPRO_IMG2DATASET_ENV or ~/.cache/sd-repro/...)")
    p.add_argument("--force", action="store_true", help="recreate even if a working one is there")
    p.add_argument("--extra", action="append", default=[], metavar="REQ",
                   help="another requirement, repeatable: --extra pyspark --extra s3fs for distributed runs")
    p.set_defaults(func=cmd_download_env)

    p = sub.add_parser("download", help="download a filtered subset into WebDataset shards with img2dataset",
                       description="Run img2dataset (in its own venv, created if missing) on parquet URL lists, then "
                                   "count successes and failures by message. Re-running the same command resumes. "
                                   "The report is written to OUT.download.json, beside OUT.")
    p.add_argument("url_list", help="a parquet file or a folder of them (the filter's output)")
    p.add_argument("--out", required=True, help="output folder (or s3://... with s3fs in the img2dataset env)")
    p.add_argument("--stage", choices=list(STAGES), help="take image size and min image size from a preset")
    p.add_argument("--image-size", type=int)
    p.add_argument("--resize-mode", choices=["center_crop", "keep_ratio", "keep_ratio_largest", "border", "no"],
                   help="default center_crop: shorter side to --image-size, then a centred square")
    p.add_argument("--resize-only-if-bigger", action="store_true", help="never upscale (outputs then vary in size)")
    p.add_argument("--min-image-size", type=int, help="drop images whose shorter side is below this")
    p.add_argument("--max-aspect-ratio", type=float, default=None, help="drop images longer/shorter above this")
    p.add_argument("--url-col")
    p.add_argument("--caption-col")
    p.add_argument("--save-columns", type=_csv, default=None,
                   help="metadata columns to copy into each json (default: all but URL/caption)")
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--processes", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--timeout", type=int, help="per-URL timeout in seconds")
    p.add_argument("--retries", type=int)
    p.add_argument("--encode-quality", type=int)
    p.add_argument("--incremental-mode", choices=["incremental", "overwrite", "extend"])
    p.add_argument("--distributor", choices=["multiprocessing", "pyspark", "ray"],
                   help="pyspark for LAION-2B scale (see data/download.py)")
    p.add_argument("--subjob-size", type=int)
    p.add_argument("--spark-master", help="with --distributor pyspark: e.g. spark://head:7077 (default: local Spark)")
    p.add_argument("--enable-wandb", action="store_true")
    p.add_argument("--env", default=None, help="img2dataset venv (default as for download-env)")
    p.add_argument("--report", default=None, help="report path (default OUT.download.json)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("precompute", help="encode image shards to latent shards with the frozen VAE/CLIP",
                       description="Write one latent shard per image shard (data/latent_format.py): VAE posterior "
                                   "mean+std of the loader's centre crop, caption, json, and the CLIP context of "
                                   "the caption plus CLIP(\"\") unless --no-text. Re-running resumes.")
    p.add_argument("inputs", nargs="+", help="image shards (.tar) or folders of them")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", help="an SD v1 .ckpt/.safetensors (its VAE and text encoder are used)")
    p.add_argument("--vae", help="instead: the VAE alone, from the LDM autoencoder's model.ckpt (kl-f8) or a "
                   "diffusers vae/ folder")
    p.add_argument("--text-encoder", help="with --vae: a transformers CLIP folder (openai/clip-vit-large-patch14)")
    p.add_argument("--random", action="store_true", help="random models instead of a checkpoint (smoke tests)")
    p.add_argument("--arch", choices=["sd-v1", "tiny"], default="sd-v1")
    p.add_argument("--seed", type=int, default=0, help="for --random")
    p.add_argument("--resolution", type=int, help="crop size in pixels (latents are 1/8 of it)")
    p.add_argument("--stage", choices=list(STAGES), help="take the resolution from a preset")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-text", action="store_true", help="latents only")
    p.add_argument("--device", default="cpu", help="e.g. cuda:1; cuda alone under torchrun or srun is the "
                   "process's own GPU (LOCAL_RANK / SLURM_LOCALID)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: bf16 autocast, as a parallel.precision=bf16 run encodes images in its loop")
    p.add_argument("--decode-workers", type=int, default=4)
    p.add_argument("--part", default="0/1", help="I/N: this worker's share of the shards (every N-th from I); env: "
                   "I and N from torchrun (RANK/WORLD_SIZE) or srun (SLURM_PROCID/SLURM_NTASKS)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("synth", help="write synthetic shards in img2dataset's format",
                       description="Coloured shapes with exact captions and LAION-like metadata, deterministic "
                                   "from --seed (data/synth.py).")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError, TimeoutError) as err:
        # Configuration and input errors carry their fix in the message; no traceback needed.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"python -m data {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
