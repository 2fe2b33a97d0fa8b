"""What an evaluation sweep leaves behind: the results table (CSV + JSON), image grids, the FID against
CLIP score plot in the style of the SD v1 model card's figure, and a W&B run holding all of them.

`python -m tools.evaluate` writes these at the end of every sweep. This command redraws them from the
results.json of one or several sweeps, e.g. checkpoints evaluated by separate jobs, into one figure:

    python -m tools.sweep RESULTS.json [RESULTS.json ...] --out DIR [--model-card]
        [--wandb-project P [--wandb-entity E] [--wandb-name N] [--wandb-mode online|offline]]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

FIELDS = ("checkpoint", "scale", "fid", "clip_score", "num_images", "weights", "path", "sampler", "steps", "eta",
          "height", "width", "seed", "caption_seed")
# Best points of the SD v1 model card's figure (FID on 10k COCO-2017 val captions against CLIP ViT-L/14
# score, 50 PLMS steps, 512x512), read off the plot, so approximate. Its CLIP score peaks near 0.266 at
# scale 8.
MODEL_CARD_BEST = ({"checkpoint": "v1-1", "scale": 3.0, "fid": 15.9, "clip_score": 0.249},
                   {"checkpoint": "v1-2", "scale": None, "fid": 16.2, "clip_score": 0.255},
                   {"checkpoint": "v1-3", "scale": None, "fid": 15.5, "clip_score": 0.258})


@dataclass(frozen=True)
class WandbConfig:
    project: str
    entity: str | None = None
    name: str | None = None
    mode: str | None = None  # online / offline / disabled; None: wandb's default (WANDB_MODE)
    dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"wandb mode={self.mode!r}: choose online, offline or disabled")


def write_results(rows: Sequence[dict], out: Path, protocol: dict) -> tuple[Path, Path]:
    """results.csv (one row per checkpoint and scale) and results.json (the rows and the protocol)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "results.csv", out / "results.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"protocol": protocol, "rows": list(rows)}, indent=2) + "\n")
    return csv_path, json_path


def read_results(paths: Sequence[str | os.PathLike]) -> tuple[list[dict], list[dict]]:
    rows, protocols = [], []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "rows" not in data:
            raise ValueError(f"{p}: not a results.json of tools.evaluate (no 'rows')")
        rows += data["rows"]
        protocols.append(data.get("protocol", {}))
    return rows, protocols


def pareto_front(rows: Sequence[dict]) -> list[dict]:
    """Rows no other row beats on both axes (lower FID and higher CLIP score), by CLIP score."""
    front = [r for r in rows if not any(o["fid"] <= r["fid"] and o["clip_score"] >= r["clip_score"]
                                        and (o["fid"], o["clip_score"]) != (r["fid"], r["clip_score"]) for o in rows)]
    return sorted(front, key=lambda r: r["clip_score"])


def by_checkpoint(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["checkpoint"], []).append(r)
    return {k: sorted(v, key=lambda r: r["scale"]) for k, v in out.items()}


def plot_fid_vs_clip(rows: Sequence[dict], path: Path, model_card: bool = False, title: str | None = None) -> Path:
    """One line per checkpoint through its guidance scales (CLIP score on x, FID on y, each point labelled
    with its scale, the lowest FID starred), as the model card's figure; the Pareto front of all points
    dashed; optionally the model card's best points."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=150)
    for name, points in by_checkpoint(rows).items():
        x, y = [p["clip_score"] for p in points], [p["fid"] for p in points]
        (line,) = ax.plot(x, y, marker="o", label=name)
        for p in points:
            ax.annotate(f"{p['scale']:g}", (p["clip_score"], p["fid"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=line.get_color())
        best = min(points, key=lambda p: p["fid"])
        ax.plot([best["clip_score"]], [best["fid"]], marker="*", markersize=14, color=line.get_color(),
                markeredgecolor="black", linestyle="none")
    front = pareto_front(rows)
    if len(front) > 1:
        ax.plot([p["clip_score"] for p in front], [p["fid"] for p in front], linestyle="--", color="grey",
                linewidth=1, label="Pareto front")
    if model_card:
        for i, ref in enumerate(MODEL_CARD_BEST):
            ax.plot([ref["clip_score"]], [ref["fid"]], marker="X", markersize=9, color="black", alpha=0.5,
                    linestyle="none", label="model card, best FID" if i == 0 else None)
            ax.annotate(ref["checkpoint"], (ref["clip_score"], ref["fid"]), textcoords="offset points",
                        xytext=(5, -12 - 8 * i), fontsize=7, alpha=0.7)
    n = sorted({r.get("num_images") for r in rows} - {None})
    ax.set_xlabel("CLIP score (ViT-L/14 cosine)")
    ax.set_ylabel(f"FID ({', '.join(f'{k:,}' for k in n) or '?'} images)")
    ax.set_title(title or "FID vs CLIP score over guidance scales (labels: scale)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def image_grid(rows_of_images: Sequence[Sequence[Path]], labels: Sequence[str], thumb: int = 256) -> Image.Image:
    """Images in rows (one row per label, e.g. per guidance scale), resized to thumb x thumb, with the
    label written at the left of each row."""
    cols = max((len(r) for r in rows_of_images), default=0)
    margin = 64
    grid = Image.new("RGB", (margin + cols * thumb, len(rows_of_images) * thumb), "white")
    draw = ImageDraw.Draw(grid)
    for i, (paths, label) in enumerate(zip(rows_of_images, labels)):
        draw.text((4, i * thumb + thumb // 2 - 6), label, fill="black")
        for j, p in enumerate(paths):
            with Image.open(p) as im:
                grid.paste(im.convert("RGB").resize((thumb, thumb), Image.BICUBIC), (margin + j * thumb, i * thumb))
    return grid


def log_wandb(cfg: WandbConfig, rows: Sequence[dict], protocol: dict, plot: Path | None,
              grids: dict[str, Path]) -> str:
    """One W&B run: the table, a native scatter of it, every (checkpoint, scale) in the summary, the plot and
    the grids as images. Returns the run's directory."""
    import wandb

    run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, mode=cfg.mode, dir=cfg.dir,
                     config=protocol, job_type="eval")
    try:
        table = wandb.Table(columns=list(FIELDS), data=[[r.get(f) for f in FIELDS] for r in rows])
        logged = {"results": table,
                  "fid_vs_clip_scatter": wandb.plot.scatter(table, "clip_score", "fid", title="FID vs CLIP score")}
        if plot is not None:
            logged["fid_vs_clip"] = wandb.Image(str(plot))
        logged.update({f"grid/{name}": wandb.Image(str(p)) for name, p in grids.items()})
        run.log(logged)
        for r in rows:
            key = f"{r['checkpoint']}/scale_{r['scale']:g}"
            run.summary[f"{key}/fid"] = r["fid"]
            run.summary[f"{key}/clip_score"] = r["clip_score"]
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def add_wandb_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wandb-project", help="log the results to this W&B project")
    parser.add_argument("--wandb-entity")
    parser.add_argument("--wandb-name")
    parser.add_argument("--wandb-mode", choices=("online", "offline", "disabled"))
    parser.add_argument("--wandb-dir", help="where W&B writes its run folder")


def wandb_config(args: argparse.Namespace) -> WandbConfig | None:
    if not args.wandb_project:
        return None
    return WandbConfig(args.wandb_project, args.wandb_entity, args.wandb_name, args.wandb_mode, args.wandb_dir)


def summarise(rows: Sequence[dict]) -> str:
    """A text table of the rows, best FID of each checkpoint marked."""
    lines = [f"{'checkpoint':<24} {'scale':>5} {'FID':>9} {'CLIP':>7}"]
    for name, points in by_checkpoint(rows).items():
        best = min(points, key=lambda p: p["fid"])
        for p in points:
            mark = " *" if p is best else ""
            lines.append(f"{name:<24} {p['scale']:>5g} {p['fid']:>9.3f} {p['clip_score']:>7.4f}{mark}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files written by tools.evaluate")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-card", action="store_true", help="mark the model card's best points on the plot")
    add_wandb_args(parser)
    args = parser.parse_args(argv)
    try:
        rows, protocols = read_results(args.results)
    except (OSError, ValueError) as err:  # a missing file, or not tools.evaluate's JSON
        parser.error(str(err))
    if not rows:
        parser.error("no rows in " + ", ".join(map(str, args.results)))
    bad = [r for r in rows if not (math.isfinite(r["fid"]) and math.isfinite(r["clip_score"]))]
    if bad:
        parser.error(f"rows without finite FID / CLIP score: {[(r['checkpoint'], r['scale']) for r in bad]}")
    protocol = {"merged_from": [str(p) for p in args.results], "protocols": protocols}
    csv_path, json_path = write_results(rows, args.out, protocol)
    plot = plot_fid_vs_clip(rows, args.out / "pareto.png", model_card=args.model_card)
    print("\n".join(map(str, (csv_path, json_path, plot))))
    wandb_cfg = wandb_config(args)
    if wandb_cfg is not None:
        print(f"W&B: {log_wandb(wandb_cfg, rows, protocol, plot, {})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
