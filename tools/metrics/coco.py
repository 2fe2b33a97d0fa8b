"""COCO-2017 captions for the model card's protocol: N captions drawn with a seed from a local
`annotations/captions_val2017.json` (5,000 images, about 25,000 captions).

The draw is one caption per image, in rounds: the images are shuffled, each image's captions are
shuffled, round r takes the r-th caption of every image in image order, until N are drawn. For N up to
the number of images (5,000) every caption comes from a different image; the model card's 10,000 take
two different captions from each image. The result depends only on the file and the seed (numpy's
PCG64 `default_rng`); the evaluation also writes it to captions.json next to the images.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Caption:
    index: int  # position in the draw: image `index` of an evaluation uses this caption
    image_id: int
    caption_id: int
    caption: str
    file_name: str

    def to_json(self) -> dict:
        return asdict(self)


def read_captions_file(path: str | os.PathLike) -> tuple[dict[int, str], dict[int, list[tuple[int, str]]]]:
    """({image_id: file_name}, {image_id: [(annotation_id, caption), ...] sorted by annotation id})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no COCO captions file at {path} (annotations/captions_val2017.json of "
                                "annotations_trainval2017.zip)")
    data = json.loads(path.read_text())
    if "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    files = {int(im["id"]): im["file_name"] for im in data["images"]}
    captions: dict[int, list[tuple[int, str]]] = {i: [] for i in files}
    for ann in data["annotations"]:
        # Raw captions carry stray whitespace and newlines ("A man riding a wave.\n"); nothing else is touched.
        captions.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), " ".join(ann["caption"].split())))
    missing = sorted(set(captions) - set(files))
    if missing:
        raise ValueError(f"{path}: captions for images not listed in 'images' (ids {missing[:5]}...)")
    return files, {i: sorted(c) for i, c in captions.items() if c}


def draw_captions(path: str | os.PathLike, n: int, seed: int = 0) -> list[Caption]:
    files, captions = read_captions_file(path)
    total = sum(len(c) for c in captions.values())
    if not 1 <= n <= total:
        raise ValueError(f"cannot draw {n} captions: {path} has {total} (choose --num-prompts <= {total})")
    rng = np.random.default_rng(seed)
    image_ids = sorted(captions)
    order = [image_ids[i] for i in rng.permutation(len(image_ids))]
    shuffled = {i: [captions[i][j] for j in rng.permutation(len(captions[i]))] for i in image_ids}
    out: list[Caption] = []
    for r in range(max(len(c) for c in captions.values())):
        for image_id in order:
            if r < len(shuffled[image_id]):
                ann_id, text = shuffled[image_id][r]
                out.append(Caption(len(out), image_id, ann_id, text, files[image_id]))
                if len(out) == n:
                    return out
    raise AssertionError("unreachable: n <= total")


def reference_files(draw: list[Caption], images_dir: str | os.PathLike) -> list[Path]:
    """The distinct real images behind the drawn captions, in draw order (all 5,000 when N >= 5,000)."""
    images_dir = Path(images_dir)
    seen: dict[str, None] = {}
    for c in draw:
        seen.setdefault(c.file_name, None)
    paths = [images_dir / name for name in seen]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} COCO images missing under {images_dir}, e.g. {absent[0]} "
                                "(pass the val2017/ folder with --coco-images)")
    return paths


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """A real image as the generated ones are: RGB, the centred square of its short side, size x size
    (PIL bicubic, which antialiases when shrinking)."""
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
