"""Small captioned datasets in img2dataset's output format, for tests and benchmarks without LAION.

Each sample is one coloured shape on a plain background with a caption that says exactly what it
is ("a red circle on a white background"), so a model trained on it, or an image generated from one
of its captions, can be checked by colour. The json of every sample carries the LAION columns the
stage filters read (original size, aesthetic, pwatermark, punsafe, similarity) with values spread
across the filter thresholds, so every filter has something to remove.

Per shard, as img2dataset writes it: `NNNNN.tar` ({key}.jpg, {key}.txt, {key}.json),
`NNNNN_stats.json`, and `NNNNN.parquet` when pyarrow is installed (it is optional here).
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

# Six hues at least 116 apart in RGB (blue-purple the closest pair). Orange was here until 2026-11-29: 86 from
# yellow and 104 from red, it was the colour the miniature's check missed most (an AVX2 draw read it as its
# neighbours in 10 of 16 samples and failed at 76%); cyan, 141 from its nearest (blue), took its place.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "cyan": (40, 210, 230),
    "purple": (130, 40, 170),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Shorter sides of the "original" images: some below 512 (removed by the 512 filter), some at or
# above 1024 (kept by the laion-high-resolution filter of sd-v1-1's second stage).
ORIGINAL_SHORT_SIDES = (256, 384, 480, 512, 640, 768, 1024, 1080, 1536, 2048)
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9))
JPEG_QUALITY = 95  # img2dataset's default encode_quality


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _contrasting_backgrounds(color: str) -> list[str]:
    # A yellow square on white is hard to see (and to check by colour): keep backgrounds whose
    # brightness differs from the shape's by a clear margin.
    return [b for b, rgb in BACKGROUNDS.items() if abs(_luma(rgb) - _luma(COLORS[color])) >= 60]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def synthetic_sample(rng: random.Random, image_size: int) -> tuple[Image.Image, dict]:
    """One image (shorter side = image_size, the aspect ratio of its "original") and its metadata."""
    shape = rng.choice(SHAPES)
    color = rng.choice(sorted(COLORS))
    background = rng.choice(_contrasting_backgrounds(color))
    aw, ah = rng.choice(ASPECTS)
    short = rng.choice(ORIGINAL_SHORT_SIDES)
    scale = short / min(aw, ah)
    original_width, original_height = round(aw * scale), round(ah * scale)
    # Stored like img2dataset's resize_mode="keep_ratio": the shorter side is image_size.
    s = image_size / min(original_width, original_height)
    width, height = max(image_size, round(original_width * s)), max(image_size, round(original_height * s))

    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    # The shape stays inside the central square, so a centre crop (or any crop of the shorter
    # side) keeps it whole and a colour check on the crop finds it.
    side = round(image_size * rng.uniform(0.45, 0.7))
    left = (width - image_size) // 2 + rng.randint(0, image_size - side)
    top = (height - image_size) // 2 + rng.randint(0, image_size - side)
    _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + side - 1, top + side - 1), COLORS[color])

    meta = {
        "shape": shape,
        "color": color,
        "color_rgb": list(COLORS[color]),
        "background": background,
        "background_rgb": list(BACKGROUNDS[background]),
        "shape_box": [left, top, left + side, top + side],
        "width": width,
        "height": height,
        "original_width": original_width,
        "original_height": original_height,
        # LAION-5B columns, spread across the thresholds of the SD v1 subsets
        # (aesthetic > 5.0, pwatermark < 0.5, punsafe < 0.1).
        "aesthetic": round(rng.uniform(3.5, 7.5), 4),
        "pwatermark": round(rng.betavariate(1.0, 2.5), 4),
        "punsafe": round(rng.betavariate(0.6, 8.0), 4),
        "similarity": round(rng.uniform(0.26, 0.40), 4),
    }
    return image, meta


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def write_synthetic_shards(out_dir: str | Path, num_shards: int, samples_per_shard: int,
                           image_size: int = 64, seed: int = 0) -> list[Path]:
    """Writes shards 00000.tar ... and returns their paths. Deterministic from `seed`; each shard
    depends only on (seed, shard index), so a larger num_shards extends a smaller one."""
    if num_shards < 1 or samples_per_shard < 1 or image_size < 8:
        raise ValueError(f"num_shards={num_shards}, samples_per_shard={samples_per_shard}, image_size={image_size}: "
                         "shards and samples must be >= 1, images at least 8 px (one latent pixel)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(samples_per_shard - 1)))
    paths = []
    for shard in range(num_shards):
        rng = random.Random(f"synth/{seed}/{shard}")
        rows = []
        path = out_dir / f"{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(samples_per_shard):
                key = f"{shard:05d}{index:0{digits}d}"
                image, meta = synthetic_sample(rng, image_size)
                article = "an" if meta["color"][0] in "aeiou" else "a"
                caption = f"{article} {meta['color']} {meta['shape']} on a {meta['background']} background"
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=JPEG_QUALITY)
                row = {"url": f"https://synthetic.invalid/{seed}/{key}.jpg", "caption": caption, "key": key,
                       "status": "success", "error_message": None, **meta}
                _add_member(tar, f"{key}.jpg", buf.getvalue())
                _add_member(tar, f"{key}.txt", caption.encode())
                _add_member(tar, f"{key}.json", json.dumps(row).encode())
                rows.append(row)
        stats = {"count": samples_per_shard, "successes": samples_per_shard, "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": samples_per_shard}}
        (out_dir / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        _write_parquet(out_dir / f"{shard:05d}.parquet", rows)
        paths.append(path)
    return paths


def _write_parquet(path: Path, rows: list[dict]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # img2dataset always writes it; nothing here reads it, so it stays optional
        return
    columns = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
               "original_height", "aesthetic", "pwatermark", "punsafe", "similarity")
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), path)
