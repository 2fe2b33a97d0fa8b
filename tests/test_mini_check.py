"""The miniature's conditioning check (train/mini.py) reads colours right, judged by the data generator's
own labels, and samples what it says it samples; its stages' output is free of a warning that only the
toy's 1x1 level raises."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.synth import BACKGROUNDS, COLORS, SHAPES, synthetic_sample
from launch.torchrun import free_port
from train import mini


def _centre_square(image: Image.Image, meta: dict) -> tuple[torch.Tensor, list[int]]:
    """The central square crop (the shape is inside it, data/synth.py) as [3, S, S] in [0, 1], and the
    shape's box in the crop's coordinates."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    crop = np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0
    x0, y0, x1, y1 = meta["shape_box"]
    return torch.from_numpy(crop).permute(2, 0, 1), [x0 - left, y0 - top, x1 - left, y1 - top]


def test_reads_the_generators_colour_on_its_own_images():
    rng = random.Random(0)
    for _ in range(60):
        image, meta = synthetic_sample(rng, 128)
        pixels, _ = _centre_square(image, meta)
        assert mini.dominant_shape_colour(pixels) == meta["color"], meta


def test_reads_a_recoloured_shape_as_its_new_colour():
    rng = random.Random(1)
    names = sorted(COLORS)
    for i in range(24):
        image, meta = synthetic_sample(rng, 128)
        pixels, (x0, y0, x1, y1) = _centre_square(image, meta)
        other = names[(names.index(meta["color"]) + 1 + i % 5) % len(names)]
        shape = (pixels - torch.tensor(meta["color_rgb"]).view(3, 1, 1) / 255).abs().amax(dim=0) < 0.1
        pixels[:, shape] = torch.tensor(COLORS[other], dtype=torch.float32).view(3, 1) / 255
        assert mini.dominant_shape_colour(pixels) == other


def test_a_background_alone_has_no_shape_colour():
    for rgb in BACKGROUNDS.values():
        field = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32) / 255
        assert mini.dominant_shape_colour(field) is None


def test_prompts_cover_every_colour_and_shape_with_distinct_seeds():
    from collections import Counter

    from data.synth import _contrasting_backgrounds

    cases = mini.prompts()
    pairs = Counter((c["color"], next(s for s in SHAPES if s in c["prompt"])) for c in cases)
    assert pairs == {(c, s): mini.SEEDS_PER_PROMPT for c in COLORS for s in SHAPES}
    assert len({c["seed"] for c in cases}) == len(cases)
    for case in cases:
        assert f" {case['color']} " in case["prompt"] and case["prompt"].endswith(f"on a {case['background']} background")
        assert case["background"] in _contrasting_backgrounds(case["color"])


def _untrained_mini_models():
    from models.configs import mini as mini_config
    from models.stable_diffusion import build_models
    from tools.sample import SamplingModels

    torch.manual_seed(0)
    m = build_models(mini_config())
    return SamplingModels.of(m.unet.eval(), m.vae, m.text_encoder, m.schedule, "cpu", "raw")


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_evaluate_samples_every_case_and_scores_them(scale):
    models = _untrained_mini_models()
    result = mini.evaluate(models, scale=scale, steps=2)
    assert len(result["cases"]) == len(result["images"]) == len(mini.prompts())
    hits = [c["generated_color"] == c["color"] for c in result["cases"]]
    assert result["accuracy"] == sum(hits) / len(hits)
    assert result["images"].shape[1:] == (3, 128, 128)
    assert result["clip_x0"] == 1.0  # pred_x0 clamped to the pixel-space first stage's range
    assert result["eta"] == 1.0  # fresh noise at every step, drawn from each sample's seed


def test_evaluate_step_noise_reaches_the_sampler_and_comes_from_the_seeds():
    """eta is not only reported: the check's images differ from the deterministic path's (eta 0), and a second
    evaluation draws the same step noise, so the check stays a function of the trained weights."""
    models = _untrained_mini_models()
    first, again = (mini.evaluate(models, steps=2)["images"] for _ in range(2))
    deterministic = mini.evaluate(models, steps=2, eta=0.0)["images"]
    assert torch.equal(first, again)
    assert not torch.allclose(first, deterministic, atol=1e-3)


DDP_AT_ONE_BY_ONE = """
import os, torch, torch.distributed as dist
from models import configs
from models.unet import UNetModel
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = configs.mini().unet
model = torch.nn.parallel.DistributedDataParallel(UNetModel(cfg), gradient_as_bucket_view=True)
x = torch.randn(32, cfg.in_channels, 8, 8)  # the miniature's 64 px stage (micro-batch 32): 1x1 at the deepest level
model(x, torch.arange(32), torch.randn(32, 77, cfg.context_dim)).square().mean().backward()
import warnings
# Whether the CPU's kernels raise DDP's warning above depends on the convolution algorithm the machine gets:
# its text again, so the filter is tested everywhere.
warnings.warn("Grad strides do not match bucket view strides. This may indicate grad was not created", UserWarning)
warnings.warn("another warning still shows", UserWarning)
dist.destroy_process_group()
"""


def test_the_stages_run_without_ddps_stride_warning_of_the_toys_one_by_one_level():
    """The stages' environment drops DDP's warning (raised on the miniature's 1x1 level) and no other."""
    repo = Path(mini.__file__).resolve().parents[1]

    def stderr_of(env):
        done = subprocess.run([sys.executable, "-c", DDP_AT_ONE_BY_ONE], cwd=repo, capture_output=True, text=True,
                              env={**env, "TEST_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stderr

    plain = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    assert "Grad strides do not match bucket view strides" in stderr_of(plain)  # nothing filters it already
    filtered = stderr_of({**plain, "PYTHONWARNINGS": mini.environment_without_toy_warnings()["PYTHONWARNINGS"]})
    assert "Grad strides" not in filtered and "another warning still shows" in filtered


def test_a_run_is_told_where_its_loss_left_the_recorded_curve():
    """Against the golden file itself: followed to the end; a loss moved beyond the golden test's tolerance at
    one step: left there; moved within it: still followed; the curve cut short: left at the first gap."""
    golden = json.loads(mini.GOLDEN_LOSS.read_text())
    points = [tuple(p) for p in golden["loss"]]
    assert mini.departure_from_golden(points, golden) is None
    k = 57
    step, loss, stage = points[k]
    assert mini.departure_from_golden([*points[:k], (step, loss * (1 + 3e-4), stage), *points[k + 1:]], golden) == step
    assert mini.departure_from_golden([*points[:k], (step, loss * (1 + 3e-5), stage), *points[k + 1:]], golden) is None
    assert mini.departure_from_golden(points[:k], golden) == step  # a curve that stops short leaves at its first gap
