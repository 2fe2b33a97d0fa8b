"""The FID Inception-v3: the TF "2015-12-05" graph ported to PyTorch, as pytorch-fid builds it.

Weights are not downloaded (pytorch-fid, torch-fidelity and clean-fid all fetch them at run time). Place
the standard file yourself and pass its path (`--inception`):

    pt_inception-2015-12-05-6726825d.pth
    from https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    (sha256 starts with 6726825d; e.g. copy it from ~/.cache/torch/hub/checkpoints/ of a machine that ran pytorch-fid)

Architecture: pytorch-fid's `fid_inception_v3`, written out here (no torchvision, whose model zoo import
alone costs seconds): torchvision's Inception3 with 1008 classes and no aux head, whose Mixed_5b..5d,
6b..6e and 7b average-pool without counting the zero padding (count_include_pad=False, as TF does) and
whose Mixed_7c pools with a max instead of an average. Module names are torchvision's, so the standard
file loads strictly. Features are pytorch-fid's default (block 3): the 2048-d global average pool after
Mixed_7c.

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
from torch import nn

STANDARD_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_SHA256_PREFIX = "6726825d"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + STANDARD_WEIGHTS
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool divides by the number of real (unpadded) pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nn.Module):  # Mixed_5b..5d
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a (grid reduction)
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                 self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a (grid reduction)
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (TF average pool), Mixed_7c (max pool: the FID graph's quirk)
    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3d = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Module names, and so state-dict keys and their order, are torchvision's Inception3 (no AuxLogits)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # The 1008-way classifier of the TF graph: unused for FID, but the weights file has it.
        self.fc = nn.Linear(2048, 1008)

    def pool_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [B, 3, H, W] (or float in [0, 1]) -> pool_3 features float32 [B, 2048]."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                   self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                   self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                   self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.avgpool)
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
    with torch.device("meta"):  # no time spent initialising weights that are replaced at once
        model = FIDInceptionV3()
    # Files saved before BatchNorm had a step counter lack `num_batches_tracked`; eval mode never reads it.
    state = dict(state)
    for key in model.state_dict():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.zeros((), dtype=torch.long))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{what}: not the FID Inception weights ({STANDARD_WEIGHTS}):\n{err}") from None
    return model.eval().requires_grad_(False)


def load_fid_inception(path: str | os.PathLike, device: torch.device | str = "cpu",
                       sha256: str | None = None) -> tuple[FIDInceptionV3, str]:
    """(model in eval mode, sha256 of the weights file), from a local copy of the standard file
    (`sha256`: the file's, when the caller has it already)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weights at {path}; download {STANDARD_WEIGHTS} from {WEIGHTS_URL} "
                                "on a machine with internet access and pass its path with --inception")
    model = fid_inception_from_state_dict(torch.load(path, map_location="cpu", weights_only=True), str(path))
    sha = sha256 or file_sha256(path)
    if not sha.startswith(STANDARD_SHA256_PREFIX):
        print(f"warning: {path} is not the standard FID Inception file (sha256 {sha[:8]}..., expected "
              f"{STANDARD_SHA256_PREFIX}...); FIDs will not be comparable to published ones", file=sys.stderr)
    return model.to(device), sha
