"""The whole evaluation offline: a tiny SD model, random-initialised Inception and CLIP networks, a
made-up COCO file. The numbers mean nothing; the files, the plumbing, the resume and the two-rank split
are checked, and FID / CLIP score are recomputed from the written PNGs by independent code (pytorch-fid's
Inception wrapper with the same weights and a nuclear-norm trace; open_clip used directly)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import reinit_zeroed_
from train_helpers import free_port
from PIL import Image

from models.configs import tiny
from models.stable_diffusion import build_models, save_ldm_checkpoint
from test_metrics import TINY_CLIP, random_inception_state, write_coco
from tools import evaluate, sample, sweep
from tools.metrics.coco import center_crop_resize
from tools.metrics.fid import FeatureStats

ROOT = Path(__file__).resolve().parents[1]
N, SCALES = 4, (1.5, 4.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    m = build_models(tiny())
    reinit_zeroed_(m.unet)
    # An EMA copy that differs from the raw weights: the evaluation must sample with it by default.
    m.unet_ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in m.unet.state_dict().items()}
    (root / "run" / "v1-x" / "export").mkdir(parents=True)
    ckpt = root / "run" / "v1-x" / "export" / "model.ckpt"  # where the trainer exports a stage
    save_ldm_checkpoint(ckpt, m)
    captions = write_coco(root / "coco", sizes=((64, 48), (40, 72), (56, 56)), captions_per_image=2)
    torch.save(random_inception_state(), root / "inception.pth")
    clip_cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32,
                                                "head_width": 32},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(clip_cfg))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    torch.manual_seed(1)
    torch.save(open_clip.create_model(TINY_CLIP, pretrained=None, force_quick_gelu=True).state_dict(), root / "clip.pt")
    return root, ckpt, captions


def argv(root, ckpt, captions, out, *extra):
    return [str(ckpt), "--coco-captions", str(captions), "--coco-images", str(root / "coco" / "val2017"),
            "--inception", str(root / "inception.pth"), "--clip", str(root / "clip.pt"),
            "--clip-arch", str(root / f"{TINY_CLIP}.json"), "--out", str(out), "--scales", "1.5,4",
            "--num-prompts", str(N), "--arch", "tiny", "--steps", "4", "--H", "64", "--W", "64",
            "--batch-size", "3", "--metric-batch-size", "4", "--num-workers", "0",
            "--cache-dir", str(root / "cache"), "--device", "cpu", *extra]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".png", ".json")
            and p.parent.name.startswith("scale_")}


@pytest.fixture(scope="module")
def finished(setup):
    root, ckpt, captions = setup
    out = root / "out"
    assert evaluate.main(argv(root, ckpt, captions, out, "--wandb-project", "sd-eval", "--wandb-mode", "offline",
                              "--wandb-dir", str(root))) == 0
    return out


def test_sweep_writes_images_metrics_and_reports(setup, finished):
    root, ckpt, captions = setup
    out = finished
    listed = json.loads((out / "captions.json").read_text())
    assert [c["seed"] for c in listed] == list(range(N)) and len({c["image_id"] for c in listed[:3]}) == 3
    for s in SCALES:
        files = sorted((out / "v1-x" / f"scale_{s:g}").glob("*.png"))
        assert [f.name for f in files] == [f"{i:05d}.png" for i in range(N)]
        assert Image.open(files[0]).size == (64, 64)
    assert "EMA" in json.loads((out / "v1-x" / "checkpoint.json").read_text())["weights"]
    # What was built for the checkpoint is recorded with it (resuming compares it).
    assert json.loads((out / "eval.json").read_text())["checkpoints"]["v1-x"]["arch"] == "tiny"

    rows = sweep.read_results([out / "results.json"])[0]
    assert [(r["checkpoint"], r["scale"]) for r in rows] == [("v1-x", 1.5), ("v1-x", 4.0)]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("checkpoint,scale,fid,clip_score") and len(csv_lines) == 3
    assert Image.open(out / "pareto.png").format == "PNG"
    assert Image.open(out / "grids" / "v1-x.png").size == (64 + N * 64, len(SCALES) * 64)
    (cached,) = (root / "cache").glob("coco_ref_3_64px_*.npz")  # 3 distinct real images behind 4 captions
    assert FeatureStats.load(cached).n == 3

    from train.wandb_records import read_run

    (run_file,) = (root / "wandb").glob("offline-run-*/run-*.wandb")
    summary = read_run(run_file).summary
    for r in rows:
        assert summary[f"v1-x/scale_{r['scale']:g}/fid"] == pytest.approx(r["fid"])
        assert summary[f"v1-x/scale_{r['scale']:g}/clip_score"] == pytest.approx(r["clip_score"])


def test_metrics_match_independent_computations(setup, finished, tmp_path):
    """FID from pytorch-fid's own Inception wrapper (same weights) and a nuclear-norm trace; CLIP score
    from open_clip directly."""
    import open_clip
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import get_activations

    root, _, _ = setup
    out = finished
    listed = json.loads((out / "captions.json").read_text())
    state = torch.load(root / "inception.pth", weights_only=True)
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: {k2: v.clone() for k2, v in state.items()}
    try:
        model = pfi.InceptionV3([3]).eval()
    finally:
        pfi.load_state_dict_from_url = original
    reals = []
    for name in dict.fromkeys(c["file_name"] for c in listed):  # the real images, as the generated ones are
        reals.append(tmp_path / name.replace(".jpg", ".png"))
        center_crop_resize(Image.open(root / "coco" / "val2017" / name), 64).save(reals[-1])
    ref = get_activations([str(p) for p in reals], model, 3, 2048, "cpu", 0)

    clip = open_clip.create_model(TINY_CLIP, pretrained=None, force_quick_gelu=True)
    clip.load_state_dict(torch.load(root / "clip.pt", weights_only=True))
    clip.eval()
    preprocess = open_clip.image_transform(224, is_train=False)
    tokens = open_clip.get_tokenizer(TINY_CLIP)([c["caption"] for c in listed])

    for row in sweep.read_results([out / "results.json"])[0]:
        files = [str(out / "v1-x" / f"scale_{row['scale']:g}" / f"{i:05d}.png") for i in range(N)]
        gen = get_activations(files, model, 2, 2048, "cpu", 0)
        a = (gen - gen.mean(0)) / np.sqrt(len(gen) - 1)
        b = (ref - ref.mean(0)) / np.sqrt(len(ref) - 1)
        # tr sqrt(S_a S_b) = nuclear norm of A B^T (S_a = A^T A, S_b = B^T B): a 4 x 3 matrix here.
        trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
        fid = ((gen.mean(0) - ref.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt
        assert row["fid"] == pytest.approx(fid, rel=1e-4)
        with torch.no_grad():
            img = clip.encode_image(torch.stack([preprocess(Image.open(f)) for f in files]))
            txt = clip.encode_text(tokens)
        assert row["clip_score"] == pytest.approx(torch.nn.functional.cosine_similarity(img, txt).mean().item(),
                                                  abs=1e-6)


def test_any_image_is_regenerated_by_tools_sample(setup, finished, tmp_path, capsys):
    root, ckpt, _ = setup
    listed = json.loads((finished / "captions.json").read_text())
    c = listed[2]
    assert sample.main([str(ckpt.parent), "--prompt", c["caption"], "--seed", str(c["seed"]), "--scale", "4",
                        "--steps", "4", "--H", "64", "--W", "64", "--arch", "tiny", "--device", "cpu",
                        "--out", str(tmp_path)]) == 0
    (again,) = tmp_path.glob(f"{c['seed']:08d}-*.png")
    original = _pixels(finished / "v1-x" / "scale_4" / "00002.png")
    # Same noise, same weights; batch 3 vs batch 1 may differ by float rounding, one level at most.
    assert np.abs(_pixels(again) - original).max() <= 1
    with pytest.raises(SystemExit):  # 32 px: 4 latent pixels cannot pass the UNet's 3 downsamplings
        sample.main([str(ckpt), "--prompt", "x", "--H", "32", "--W", "32", "--arch", "tiny", "--device", "cpu",
                     "--out", str(tmp_path)])
    assert "must be a multiple of 64" in capsys.readouterr().err


def test_rerun_reuses_everything_and_other_settings_are_refused(setup, finished, monkeypatch, capsys):
    root, ckpt, captions = setup
    before = _mtimes(finished)

    def forbidden(*args, **kwargs):
        raise AssertionError("nothing should be recomputed")

    monkeypatch.setattr(evaluate, "txt2img", forbidden)
    monkeypatch.setattr(evaluate, "load_fid_inception", forbidden)
    assert evaluate.main(argv(root, ckpt, captions, finished)) == 0
    assert _mtimes(finished) == before
    assert evaluate.main(argv(root, ckpt, captions, finished, "--seed", "7")) == 2
    assert "holds images made with other settings" in capsys.readouterr().err


class _ReachedGenerate(Exception):
    pass


def test_settings_that_cannot_sample_are_refused_before_anything_is_pinned(setup, monkeypatch, tmp_path, capsys):
    """--steps 27 (timesteps past the schedule) or --H 100 used to be refused only after the checkpoint was
    loaded, with eval.json already pinning them: the same --out then refused every corrected run. A wrong
    --arch (refused by the strict load) must not pin the folder either."""
    root, ckpt, captions = setup
    out = tmp_path / "out"

    def forbidden(*args, **kwargs):
        raise AssertionError("no weights should be read")

    monkeypatch.setattr(sample, "load_ldm_checkpoint", forbidden)
    for bad, says in ((("--steps", "27"), "steps=27"), (("--H", "100"), "must be a multiple of 64")):
        assert evaluate.main(argv(root, ckpt, captions, out, *bad)) == 2
        assert says in capsys.readouterr().err
        assert not out.exists()
        with pytest.raises(SystemExit) as exit_:
            sample.main([str(ckpt), "--prompt", "x", "--arch", "tiny", "--steps", "4", "--H", "64", "--W", "64",
                         "--device", "cpu", "--out", str(tmp_path / "samples"), *bad])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    monkeypatch.undo()

    assert evaluate.main(argv(root, ckpt, captions, out, "--arch", "sd-v1")) == 2  # the checkpoint is tiny
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().endswith("its weights are those of --arch tiny")

    def reached(*args, **kwargs):
        raise _ReachedGenerate

    monkeypatch.setattr(evaluate, "generate", reached)  # the corrected run gets past eval.json
    with pytest.raises(_ReachedGenerate):
        evaluate.main(argv(root, ckpt, captions, out))
    assert json.loads((out / "eval.json").read_text())["checkpoints"]["v1-x"]["arch"] == "tiny"


def test_killed_run_continues_where_it_stopped(setup, finished, monkeypatch):
    root, ckpt, captions = setup
    out = root / "killed"
    made = []

    def dies_on_second_batch(models, prompts, seeds, cfg, scale=None):
        if len(made) == 1:
            raise KeyboardInterrupt  # the job is killed mid-sweep
        made.append(list(seeds))
        return sample.txt2img(models, prompts, seeds, cfg, scale)

    monkeypatch.setattr(evaluate, "txt2img", dies_on_second_batch)
    # The reference statistics the first run cached, given as a pytorch-fid style .npz this time.
    (ref_stats,) = (root / "cache").glob("coco_ref_*.npz")
    extra = ("--batch-size", "2", "--scales", "1.5", "--ref-stats", str(ref_stats))
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(argv(root, ckpt, captions, out, *extra))
    folder = out / "v1-x" / "scale_1.5"
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png"]
    kept = _mtimes(out)

    made.clear()
    monkeypatch.setattr(evaluate, "txt2img", lambda *a, **k: made.append(list(a[2])) or sample.txt2img(*a, **k))
    assert evaluate.main(argv(root, ckpt, captions, out, *extra)) == 0
    assert made == [[2, 3]]  # only the missing images
    assert all(_mtimes(out)[p] == t for p, t in kept.items())
    for i in range(N):
        assert np.abs(_pixels(folder / f"{i:05d}.png") - _pixels(finished / "v1-x" / "scale_1.5" / f"{i:05d}.png")).max() <= 1
    first = sweep.read_results([finished / "results.json"])[0][0]
    again = sweep.read_results([out / "results.json"])[0][0]
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-3) and again["clip_score"] == pytest.approx(
        first["clip_score"], abs=1e-3)


def test_two_ranks_split_the_missing_images_and_gather_the_metrics(setup, finished):
    """Two real processes (torch.distributed, gloo) resume a sweep with three images of one scale gone."""
    root, ckpt, captions = setup
    out = root / "two_ranks"
    shutil.copytree(finished, out)
    folder = out / "v1-x" / "scale_4"
    for i in (1, 2, 3):
        (folder / f"{i:05d}.png").unlink()
    (folder / "metrics.json").unlink()
    kept = {p: t for p, t in _mtimes(out).items() if "scale_1.5" in str(p) or p.name == "00000.png"}
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tools.evaluate", *argv(root, ckpt, captions, out)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "v1-x scale 4: 3 of 4 images to make (2 ranks)" in logs[0]
    assert all(_mtimes(out)[p] == t for p, t in kept.items())  # scale 1.5 and image 0 untouched
    for i in range(N):
        assert np.abs(_pixels(folder / f"{i:05d}.png") - _pixels(finished / "v1-x" / "scale_4" / f"{i:05d}.png")).max() <= 1
    single = {r["scale"]: r for r in sweep.read_results([finished / "results.json"])[0]}
    for r in sweep.read_results([out / "results.json"])[0]:
        assert r["fid"] == pytest.approx(single[r["scale"]]["fid"], rel=1e-3)
        assert r["clip_score"] == pytest.approx(single[r["scale"]]["clip_score"], abs=1e-3)


def test_config_errors_say_what_to_change(setup, tmp_path):
    root, ckpt, captions = setup
    base = dict(checkpoints=(str(ckpt),), out=tmp_path, coco_captions=captions, inception=root / "inception.pth",
                clip=root / "clip.pt")
    with pytest.raises(ValueError, match="--coco-images"):
        evaluate.EvalConfig(**base)
    with pytest.raises(ValueError, match="--names"):
        evaluate.EvalConfig(**{**base, "checkpoints": (str(ckpt), str(ckpt))}, coco_images=tmp_path)
    with pytest.raises(ValueError, match="distinct guidance scales"):
        evaluate.EvalConfig(**base, coco_images=tmp_path, scales=(2.0, 2.0))
    with pytest.raises(ValueError, match="PLMS is deterministic"):
        sample.SamplingConfig(eta=0.5)
    assert evaluate.EvalConfig(**base, coco_images=tmp_path).checkpoint_names() == ["v1-x"]
    assert evaluate._default_name(Path("/ckpts/sd-v1-3-full-ema.ckpt")) == "sd-v1-3-full-ema"
    assert evaluate._default_name(Path("/runs/sd/v1-2/export")) == "v1-2"
    assert evaluate._default_name(Path("/runs/sd/v1-2/exports/step-5000/model.ckpt")) == "v1-2-step-5000"


def test_sweep_command_merges_results_and_finds_the_pareto_front(tmp_path, capsys):
    rows = [{"checkpoint": c, "scale": s, "fid": f, "clip_score": k, "num_images": 10}
            for c, s, f, k in (("a", 2, 18.0, 0.24), ("a", 3, 16.0, 0.25), ("a", 8, 20.0, 0.26),
                               ("b", 2, 17.0, 0.245), ("b", 3, 16.5, 0.249))]
    for i, part in enumerate((rows[:3], rows[3:])):
        sweep.write_results(part, tmp_path / f"run{i}", {"run": i})
    assert [(r["checkpoint"], r["scale"]) for r in sweep.pareto_front(rows)] == [("a", 3), ("a", 8)]
    # As a user runs it (the module once lacked its __main__ guard: the command did nothing, exit 0).
    proc = subprocess.run([sys.executable, "-m", "tools.sweep", str(tmp_path / "run0" / "results.json"),
                           str(tmp_path / "run1" / "results.json"), "--out", str(tmp_path / "merged"), "--model-card"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "merged" / "pareto.png") in proc.stdout
    with pytest.raises(SystemExit):  # a wrong path is the parser's message, not a traceback
        sweep.main([str(tmp_path / "run2" / "results.json"), "--out", str(tmp_path / "merged")])
    assert "No such file" in capsys.readouterr().err
    merged, _ = sweep.read_results([tmp_path / "merged" / "results.json"])
    assert merged == rows and Image.open(tmp_path / "merged" / "pareto.png").format == "PNG"
    assert "16.000" in sweep.summarise(rows)
