"""Fréchet Inception Distance, matching pytorch-fid (`fid_score.py`): Inception pool_3 features (see
inception.py for the network and preprocessing), their mean and unbiased covariance in float64
(np.cov(rowvar=False)), and

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

pytorch-fid takes scipy's sqrtm of the non-symmetric S1 S2 (and retries with eps on the diagonal when it
is singular). We use the equal trace of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues
as S1 S2): sum of the square roots of its eigenvalues, from `eigh`, in float64: a few times faster than
sqrtm at 2048 dimensions and needing no eps. Identical statistics give 0 to rounding (full rank) or to
~1e-8 of tr(S) (fewer images than dimensions, where square roots of rounding noise on the null space
remain). tests/test_metrics.py checks it against scipy's sqrtm and pytorch-fid.

Statistics files are `.npz` with `mu` and `sigma`, the layout of pytorch-fid's `--save-stats`, so its
precomputed statistics can be used as references and ours read by it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class FeatureStats:
    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    n: int
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write (temporary name, then rename): a killed run never leaves a truncated cache."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), meta=np.array(json.dumps(self.meta)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path}: a statistics file needs arrays 'mu' and 'sigma' (pytorch-fid's layout)")
            n = int(f["n"]) if "n" in f else -1
            meta = json.loads(str(f["meta"])) if "meta" in f else {}
            return cls(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), n, meta)


def feature_statistics(features: np.ndarray | torch.Tensor, meta: dict | None = None) -> FeatureStats:
    """Mean and unbiased covariance (ddof=1, like np.cov) in float64 of features [N, D]."""
    f = torch.as_tensor(np.asarray(features)).double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D] for a covariance, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return FeatureStats(mu.numpy(), sigma.numpy(), int(f.shape[0]), dict(meta or {}))


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _trace_sqrt(m: torch.Tensor) -> torch.Tensor:
    """tr(m^(1/2)) of a symmetric PSD matrix (symmetrised first; rounding-level negative eigenvalues -> 0)."""
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance(a: FeatureStats, b: FeatureStats | np.ndarray | torch.Tensor) -> float:
    """The Fréchet distance between two Gaussians, in float64.

    `b` may also be the features [N, D] themselves. With N < D (quick evaluations, tests) the trace term
    is then taken from the N x N matrix B S_a B^T, B = (features - mean) / sqrt(N - 1), which has the
    nonzero eigenvalues of S_a S_b (S_b = B^T B): the same number, at a fraction of the cost."""
    if not isinstance(b, FeatureStats):
        features = torch.as_tensor(np.asarray(b)).double()
        if features.ndim != 2 or features.shape[0] >= features.shape[1]:
            b = feature_statistics(features)
        else:
            return _frechet_to_features(a, features)
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics of different feature sizes: {a.mu.shape} and {b.mu.shape}")
    mu1, mu2 = torch.from_numpy(a.mu).double(), torch.from_numpy(b.mu).double()
    s1, s2 = torch.from_numpy(a.sigma).double(), torch.from_numpy(b.sigma).double()
    root1 = _sqrt_psd(s1)
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * _trace_sqrt(root1 @ s2 @ root1))


def _frechet_to_features(a: FeatureStats, features: torch.Tensor) -> float:
    if features.shape[0] < 2 or features.shape[1] != a.mu.shape[0]:
        raise ValueError(f"features of shape {tuple(features.shape)} against statistics of size {a.mu.shape[0]}")
    mu1, s1 = torch.from_numpy(a.mu).double(), torch.from_numpy(a.sigma).double()
    mu2 = features.mean(0)
    centred = (features - mu2) / (features.shape[0] - 1) ** 0.5
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + (centred * centred).sum() - 2 * _trace_sqrt(centred @ s1 @ centred.T))
