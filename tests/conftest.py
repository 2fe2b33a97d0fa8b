import json
import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"

# Tests must never reach a model hub: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def reference_layout() -> dict:
    """Key/shape layout of the released SD v1 checkpoints (derived from the CompVis code)."""
    return json.loads((ASSETS / "sd_v1_state_dict.json").read_text())


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> str:
    """Two synthetic shards of 16 captioned 64 px images, as a brace pattern for stage.data.shards."""
    from data.synth import write_synthetic_shards

    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, num_shards=2, samples_per_shard=16, image_size=64, seed=0)
    return f"{out}/{{00000..00001}}.tar"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def reinit_zeroed_(module: torch.nn.Module) -> torch.nn.Module:
    """Gives the layers the UNet zero-initialises (CompVis' zero_module: last conv of each residual branch,
    proj_out, conv_out) torch's default init, so a random test model's output and every gradient depend
    on every weight (a zero conv_out would make outputs 0 and comparisons vacuous)."""
    with torch.no_grad():
        for m in module.modules():
            own = list(m.parameters(recurse=False))
            if own and hasattr(m, "reset_parameters") and all(not p.any() for p in own):
                m.reset_parameters()
    return module
