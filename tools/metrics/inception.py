"""The FID Inception-v3: the TF "2015-12-05" graph ported to PyTorch, as pytorch-fid builds it.

Weights are not downloaded (pytorch-fid, torch-fidelity and clean-fid all fetch them at run time). Place
the standard file yourself and pass its path (`--inception`):

    pt_inception-2015-12-05-6726825d.pth
    from https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    (sha256 starts with 6726825d; e.g. copy it from ~/.cache/torch/hub/checkpoints/ of a machine that ran pytorch-fid)

Architecture: torchvision's Inception3 with 1008 classes and no aux head, whose Mixed_5b..5d, 6b..6e and
7b use average pooling that ignores the zero padding (count_include_pad=False, as TF does) and whose
Mixed_7c pools with a max instead of an average; the state-dict keys are torchvision's, so the file loads
strictly. Features are pytorch-fid's default (block 3): the 2048-d global average pool after Mixed_7c.

Preprocessing, pytorch-fid's exactly: uint8 RGB -> float / 255 (ToTensor) -> bilinear resize to 299x299
(F.interpolate, align_corners=False, no antialiasing) -> 2x - 1.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

STANDARD_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_SHA256_PREFIX = "6726825d"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + STANDARD_WEIGHTS
FEATURE_DIM = 2048


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool divides by the number of real (unpadded) pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionC(InceptionC):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7d = layer(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionE(InceptionE):
    """InceptionE with TF's pooling: an average without padding (Mixed_7b) or a max (Mixed_7c)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__(in_channels)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, b3d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(Inception3):
    def __init__(self) -> None:
        # init_weights=False: the weights are always loaded; torchvision's init would only cost time.
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")

    def pool_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [B, 3, H, W] (or float in [0, 1]) -> pool_3 features float32 [B, 2048]."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.avgpool):
            x = layer(x)
        return x.flatten(1)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fid_inception_from_state_dict(state: dict[str, torch.Tensor], what: str = "state dict") -> FIDInceptionV3:
    """The network with these weights, in eval mode. Strict: every key of the standard file, no other."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: expected a state dict of tensors ({STANDARD_WEIGHTS})")
    model = FIDInceptionV3()
    # Files saved before BatchNorm had a step counter lack `num_batches_tracked`; eval mode never reads it.
    state = dict(state)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{what}: not the FID Inception weights ({STANDARD_WEIGHTS}):\n{err}") from None
    return model.eval().requires_grad_(False)


def load_fid_inception(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[FIDInceptionV3, str]:
    """(model in eval mode, sha256 of the weights file), from a local copy of the standard file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weights at {path}; download {STANDARD_WEIGHTS} from {WEIGHTS_URL} "
                                "on a machine with internet access and pass its path with --inception")
    model = fid_inception_from_state_dict(torch.load(path, map_location="cpu", weights_only=True), str(path))
    sha = file_sha256(path)
    if not sha.startswith(STANDARD_SHA256_PREFIX):
        print(f"warning: {path} is not the standard FID Inception file (sha256 {sha[:8]}..., expected "
              f"{STANDARD_SHA256_PREFIX}...); FIDs will not be comparable to published ones", file=sys.stderr)
    return model.to(device), sha
