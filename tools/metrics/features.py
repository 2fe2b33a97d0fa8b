"""Per-image features of image files, batched: Inception pool_3 features for FID and CLIP scores
against captions. Each image is decoded once and fed to both networks."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .clip_score import CLIPScorer
from .coco import center_crop_resize
from .inception import FEATURE_DIM, FIDInceptionV3


class ImageFiles(Dataset):
    """uint8 [3, H, W] (pytorch-fid reads PNGs the same way: PIL, RGB) and, with a CLIP transform, its
    CLIP input. `resize`: centre crop + resize to a square first (real COCO images)."""

    def __init__(self, paths: Sequence[str | os.PathLike], resize: int | None = None, clip_preprocess=None):
        self.paths, self.resize, self.clip_preprocess = list(paths), resize, clip_preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[i]) as im:
            image = center_crop_resize(im, self.resize) if self.resize else im.convert("RGB")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        clip = self.clip_preprocess(image) if self.clip_preprocess is not None else torch.empty(0)
        return pixels, clip


@torch.no_grad()
def image_features(paths: Sequence[str | os.PathLike], inception: FIDInceptionV3 | None = None,
                   clip: CLIPScorer | None = None, captions: Sequence[str] | None = None, resize: int | None = None,
                   batch_size: int = 50, num_workers: int = 0) -> dict[str, np.ndarray]:
    """{"inception": float32 [N, 2048]} and/or {"clip": float64 [N]} (cosine of image i and captions[i])."""
    if clip is not None and (captions is None or len(captions) != len(paths)):
        raise ValueError("CLIP scores need one caption per image")
    data = ImageFiles(paths, resize, clip.preprocess if clip is not None else None)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = next(inception.parameters()).device if inception is not None else None
    feats, scores, done = [], [], 0
    for pixels, clip_pixels in loader:
        if inception is not None:
            feats.append(inception.pool_features(pixels.to(device)).float().cpu())
        if clip is not None:
            scores.append(clip.scores_from_pixels(clip_pixels, captions[done:done + len(pixels)]))
        done += len(pixels)
    out: dict[str, np.ndarray] = {}
    if inception is not None:
        out["inception"] = torch.cat(feats).numpy() if feats else np.zeros((0, FEATURE_DIM), np.float32)
    if clip is not None:
        out["clip"] = torch.cat(scores).numpy() if scores else np.zeros(0, np.float64)
    return out
