"""FID (against pytorch-fid, with the same random weights, and against scipy's sqrtm), the FID Inception's
key layout and preprocessing, CLIP score (against open_clip used directly) and the COCO caption draw.

No real weights exist offline: Inception and CLIP are randomly initialised here and saved in the layout
of the real files. The Inception's BatchNorm statistics are set from one batch of noise so that its
activations keep a unit scale through 94 layers (with PyTorch's default init they would shrink to ~0).
"""
import functools
import json
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from tools.metrics import coco
from tools.metrics.clip_score import load_clip
from tools.metrics.features import image_features
from tools.metrics.fid import FeatureStats, feature_statistics, frechet_distance
from tools.metrics.inception import FIDInceptionV3, fid_inception_from_state_dict, load_fid_inception

TINY_CLIP = "sdrepro-test-tiny-clip"


@functools.lru_cache(maxsize=1)  # shared by the test files; callers only read it
def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats = the mean over the calibration batch
    with torch.no_grad():
        model.train().pool_features(torch.rand(3, 3, 299, 299))
    return model.state_dict()


def write_random_inception(path, seed: int = 0):
    torch.save(random_inception_state(seed), path)
    return path


def register_tiny_clip(tmp_path) -> str:
    """A tiny open_clip architecture (same code path as ViT-L-14, 224-pixel input) for fast tests."""
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32,
                                           "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    path = tmp_path / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_CLIP


def write_random_clip(path, tmp_path, seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(register_tiny_clip(tmp_path), pretrained=None, force_quick_gelu=True)
    torch.save(model.state_dict(), path)
    return path


def write_coco(root, sizes=((64, 48), (40, 72), (56, 56)), captions_per_image=2):
    """A captions_val2017.json and val2017/ JPEGs of mixed sizes."""
    images, annotations = [], []
    rng = np.random.default_rng(0)
    (root / "val2017").mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        image_id = 100 + 7 * i
        name = f"{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for j in range(captions_per_image):
            annotations.append({"id": 1000 + 10 * i + j, "image_id": image_id, "caption": f" Image {i} caption {j}.\n"})
    path = root / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")


@pytest.fixture(scope="module")
def pytorch_fid_with(inception_file):
    """pytorch-fid itself, with its weight download replaced by our random file."""
    import pytorch_fid.inception as pfi

    state = torch.load(inception_file, weights_only=True)
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: {k: v.clone() for k, v in state.items()}
    yield pfi
    pfi.load_state_dict_from_url = original


def _images(n, h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, h, w, 3))
    return np.clip(base + rng.integers(-60, 60, (n, h, w, 3)), 0, 255).astype(np.uint8)


def test_inception_keys_are_pytorch_fids_and_load_strictly(tmp_path, inception_file, pytorch_fid_with):
    theirs = pytorch_fid_with.fid_inception_v3()  # loads our random file with load_state_dict(strict=True)
    ours, sha = load_fid_inception(inception_file)
    assert [(k, v.shape) for k, v in theirs.state_dict().items()] == [(k, v.shape) for k, v in ours.state_dict().items()]
    keys = list(ours.state_dict())
    assert len(keys) == 566 and ours.state_dict()["fc.weight"].shape == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in keys) and len(sha) == 64

    state = torch.load(inception_file, weights_only=True)
    fid_inception_from_state_dict({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    with pytest.raises(ValueError, match="extra.weight"):
        fid_inception_from_state_dict({**state, "extra.weight": torch.zeros(1)})
    del state["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.conv.weight"):
        fid_inception_from_state_dict(state)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_fid_inception(tmp_path / "absent.pth")


def test_features_and_statistics_equal_pytorch_fid(tmp_path, inception_file, pytorch_fid_with):
    """Same PNG files, same weights: pytorch-fid's ToTensor + bilinear 299 + 2x-1, its mean and covariance.
    (Its FID of two folders would add a 2048x2048 scipy sqrtm, too slow here; the distance itself is
    checked against pytorch-fid's function below.)"""
    from pytorch_fid.fid_score import compute_statistics_of_path

    (tmp_path / "a").mkdir()
    for i, im in enumerate(_images(4, 48, 64, 1)):
        Image.fromarray(im).save(tmp_path / "a" / f"{i}.png")
    theirs_model = pytorch_fid_with.InceptionV3([3]).eval()
    ours, _ = load_fid_inception(inception_file)
    features = image_features(sorted((tmp_path / "a").glob("*.png")), ours, batch_size=3)["inception"]
    stats = feature_statistics(features)
    mu, sigma = compute_statistics_of_path(str(tmp_path / "a"), theirs_model, 3, 2048, "cpu", 0)
    assert np.allclose(stats.mu, mu, rtol=1e-5, atol=1e-6 * np.abs(mu).max())
    assert np.allclose(stats.sigma, sigma, rtol=1e-4, atol=1e-5 * np.abs(sigma).max())

    # The resize happens inside the network: a 299x299 input is passed through untouched.
    x = torch.from_numpy(_images(2, 299, 299, 3)).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = theirs_model(x.float() / 255)[0].flatten(1)
        assert torch.allclose(ours.pool_features(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def _scipy_fid(f1, f2):
    """The textbook formula, independently: numpy covariances, scipy's sqrtm of the product."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_against_scipy_sqrtm_and_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(48, 48))
    f1 = rng.normal(size=(400, 48)) @ mix
    f2 = rng.normal(size=(300, 48)) @ (mix + 0.3 * rng.normal(size=(48, 48))) + 0.5
    a, b = feature_statistics(f1), feature_statistics(f2)
    ours = frechet_distance(a, b)
    assert ours == pytest.approx(_scipy_fid(f1, f2), rel=1e-9)
    assert ours == pytest.approx(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-9)
    assert ours == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert np.allclose(a.sigma, np.cov(f1, rowvar=False)) and a.n == 400

    # Fewer samples than dimensions: the N x N form from the features gives the same distance.
    few1, few2 = f1[:20], f2[:30]
    expected = _scipy_fid(few1, few2)
    assert frechet_distance(feature_statistics(few1), few2) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(feature_statistics(few1), feature_statistics(few2)) == pytest.approx(expected, rel=1e-7)

    # Identical sets give 0: to rounding with full-rank covariances; rank-deficient ones (20 samples in 48
    # dimensions) leave the square roots of rounding noise on their null space, ~1e-8 of the trace.
    assert abs(frechet_distance(a, a)) <= 1e-10 * np.trace(a.sigma)
    few = feature_statistics(few1)
    assert abs(frechet_distance(few, few)) <= 1e-7 * np.trace(few.sigma)
    assert abs(frechet_distance(few, few1)) <= 1e-7 * np.trace(few.sigma)
    shifted = few1 + 2.0
    assert frechet_distance(few, shifted) == pytest.approx(48 * 4.0, rel=1e-6)


def test_stats_files_are_pytorch_fids_npz(tmp_path):
    stats = feature_statistics(np.random.default_rng(0).normal(size=(10, 6)), meta={"what": "test"})
    stats.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:  # what pytorch-fid's compute_statistics_of_path reads
        assert np.array_equal(f["mu"], stats.mu) and np.array_equal(f["sigma"], stats.sigma)
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 10 and back.meta == {"what": "test"}
    np.savez(tmp_path / "theirs.npz", mu=stats.mu, sigma=stats.sigma)
    assert FeatureStats.load(tmp_path / "theirs.npz").n == -1
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 6)))


def test_clip_score_is_open_clips_cosine(tmp_path):
    import open_clip

    path = write_random_clip(tmp_path / "clip.pt", tmp_path)
    scorer = load_clip(path, arch=TINY_CLIP)
    images = list(_images(3, 40, 56, 5))
    captions = ["a photo of a cat", "a red bus on a street", "x" * 400]  # the last is truncated at 77 tokens
    got = scorer.scores(images, captions)

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=None, force_quick_gelu=True)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in images]))
        txt = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(captions))
    expected = torch.nn.functional.cosine_similarity(img, txt).double()
    assert got.dtype == torch.float64 and torch.allclose(got, expected, atol=1e-6)
    assert bool((got.abs() <= 1).all())  # a cosine, not torchmetrics' 100 * max(cos, 0)

    # OpenAI weights need QuickGELU: the GELU config loads the same keys and computes something else.
    gelu = load_clip(path, arch=TINY_CLIP, quick_gelu=False)
    assert not torch.allclose(gelu.scores(images, captions), got, atol=1e-4)


def test_clip_weights_in_every_layout(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    path = write_random_clip(tmp_path / "clip.pt", tmp_path)
    state = torch.load(path, weights_only=True)
    reference = load_clip(path, arch=TINY_CLIP).scores([_images(1, 32, 32, 0)[0]], ["a dog"])
    save_file(state, str(tmp_path / "clip.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, tmp_path / "train.pt")
    model = open_clip.create_model(TINY_CLIP, pretrained=None, force_quick_gelu=True).eval()
    model.load_state_dict(state)
    tokens = open_clip.get_tokenizer(TINY_CLIP)(["a"])
    with warnings.catch_warnings():  # TorchScript (the format of OpenAI's ViT-L-14.pt) is deprecated in torch 2.x
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (torch.zeros(1, 3, 224, 224), tokens), check_trace=False).save(tmp_path / "jit.pt")
    assert zipfile.is_zipfile(tmp_path / "jit.pt")
    for name in ("clip.safetensors", "train.pt", "jit.pt"):
        scores = load_clip(tmp_path / name, arch=TINY_CLIP).scores([_images(1, 32, 32, 0)[0]], ["a dog"])
        assert torch.allclose(scores, reference, atol=1e-6), name
    with pytest.raises(ValueError, match="--clip-arch"):
        load_clip(path, arch="ViT-B-32")


def test_caption_draw_is_seeded_one_per_image_per_round(tmp_path):
    path = write_coco(tmp_path, sizes=[(8, 8)] * 4, captions_per_image=3)
    draw = coco.draw_captions(path, 6, seed=1)
    assert [c.index for c in draw] == list(range(6))
    first, second = draw[:4], draw[4:]
    assert len({c.image_id for c in first}) == 4  # round 1: one caption from every image
    assert {c.image_id for c in second} <= {c.image_id for c in first}
    assert [c.image_id for c in second] == [c.image_id for c in first[:2]]  # same image order each round
    assert all(c.caption.startswith("Image ") and c.caption.endswith(".") for c in draw)  # whitespace trimmed
    pairs = [(c.image_id, c.caption_id) for c in draw]
    assert len(set(pairs)) == 6
    assert pairs == [(c.image_id, c.caption_id) for c in coco.draw_captions(path, 6, seed=1)]
    assert pairs != [(c.image_id, c.caption_id) for c in coco.draw_captions(path, 6, seed=2)]
    assert coco.draw_captions(path, 3, seed=1) == draw[:3]  # a smaller N is a prefix
    with pytest.raises(ValueError, match="--num-prompts <= 12"):
        coco.draw_captions(path, 13)
    refs = coco.reference_files(draw, tmp_path / "val2017")
    assert len(refs) == 4 and refs[0].name == draw[0].file_name
    with pytest.raises(FileNotFoundError, match="--coco-images"):
        coco.reference_files(draw, tmp_path)


def test_real_images_are_centre_cropped_to_the_generated_size():
    im = np.zeros((40, 60, 3), np.uint8)
    im[:, :10] = 255  # a white band on the left, outside the centred 40x40 square
    im[:, 50:] = 255
    out = coco.center_crop_resize(Image.fromarray(im), 16)
    assert out.size == (16, 16) and out.mode == "RGB" and np.asarray(out).max() == 0
