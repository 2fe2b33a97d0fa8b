"""Precomputed latent shards round trip: the stored posterior mean/std are the VAE's on the loader's
crop, the stored contexts are the text encoder's on the caption, CLIP("") is in every shard, keys,
captions and metadata carry over, broken samples are counted, and a re-run resumes."""
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from data.latent_format import UNCOND_KEY, decode_context, decode_latent
from data.precompute import (PrecomputeConfig, list_shards, load_models, local_device,
                             part_from_env, precompute_shards)
from data.samples import read_candidates
from data.shard_io import iter_shard_samples
from data.synth import write_synthetic_shards
from data.transforms import decode_resize_crop, to_pixels
from models.configs import TextEncoderConfig, tiny
from models.text_encoder import FrozenCLIPTextEncoder
from models.tokenizer import CLIPTokenizer
from models.vae import AutoencoderKL

RESOLUTION = 64
# The latent format stores [77, 768] contexts, so the text encoder has CLIP-L's width (one thin layer).
TEXT_CFG = TextEncoderConfig(hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=12)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return AutoencoderKL(tiny().vae).eval(), FrozenCLIPTextEncoder(TEXT_CFG), CLIPTokenizer()


def read_shard(path):
    samples = {}
    for _, key, sample in iter_shard_samples(str(path), Counter()):
        samples[key] = sample
    return samples


def add_broken_shard(path):
    """A shard with a good sample, a truncated JPEG and a sample without an image."""
    good = next(iter(read_shard(path.parent / "00000.tar").items()))
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("900000001.jpg", good[1]["jpg"])
        add("900000001.txt", b"kept")
        add("900000001.json", b"{}")
        add("900000002.jpg", good[1]["jpg"][:200])
        add("900000002.txt", b"truncated")
        add("900000003.txt", b"no image")


def test_latent_shards_round_trip(models, tmp_path):
    vae, text_encoder, tokenizer = models
    src = tmp_path / "images"
    write_synthetic_shards(src, num_shards=2, samples_per_shard=5, image_size=RESOLUTION, seed=3)
    add_broken_shard(src / "00002.tar")
    cfg = PrecomputeConfig(resolution=RESOLUTION, batch_size=3, decode_workers=2)
    report = precompute_shards(src, tmp_path / "latents", vae, text_encoder, tokenizer, cfg, progress=False)

    assert report.samples_in == 13 and report.samples_written == 11 and report.latent_size == 8
    assert report.dropped == {"corrupt_image": 1, "no_image": 1}
    assert [p.rsplit("/", 1)[-1] for p in report.shards_written] == ["00000.tar", "00001.tar", "00002.tar"]
    saved = json.loads((tmp_path / "latents.precompute.json").read_text())
    assert saved["samples_written"] == 11 and saved["config"]["resolution"] == RESOLUTION

    with torch.no_grad():
        uncond = text_encoder(tokenizer([""]))[0].numpy()
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        images, latents = read_shard(src / name), read_shard(tmp_path / "latents" / name)
        with tarfile.open(tmp_path / "latents" / name) as tar:
            assert tar.getnames()[0] == f"{UNCOND_KEY}.ctx.npy"  # first member, as the format requires
        np.testing.assert_allclose(decode_context(latents.pop(UNCOND_KEY)["ctx.npy"]), uncond, rtol=2e-3, atol=2e-3)
        expected_keys = [k for k, s in images.items() if "jpg" in s and k != "900000002"]
        assert list(latents) == expected_keys  # same keys, same order
        for key, stored in latents.items():
            image = decode_resize_crop(images[key]["jpg"], RESOLUTION, crop="center")
            with torch.no_grad():
                posterior = vae.encode(to_pixels([image]))
                context = text_encoder(tokenizer([images[key]["txt"].decode()]))[0]
            mean, std = decode_latent(stored["latent.npy"], 8)
            # float16 storage: ~3 significant digits.
            np.testing.assert_allclose(mean, posterior.mean[0].numpy(), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(std, posterior.std[0].numpy(), rtol=2e-3, atol=1e-4)
            assert (std > 0).all()
            np.testing.assert_allclose(decode_context(stored["ctx.npy"]), context.numpy(), rtol=2e-3, atol=2e-3)
            assert stored["txt"] == images[key]["txt"]
            assert json.loads(stored["json"]) == json.loads(images[key].get("json", b"{}"))

    # Re-running resumes: complete shards are left alone, a missing one is redone.
    (tmp_path / "latents" / "00001.tar").unlink()
    before = (tmp_path / "latents" / "00000.tar").stat().st_mtime_ns
    again = precompute_shards(src, tmp_path / "latents", vae, text_encoder, tokenizer, cfg, progress=False)
    assert [p.rsplit("/", 1)[-1] for p in again.shards_written] == ["00001.tar"] and len(again.shards_skipped) == 2
    assert (tmp_path / "latents" / "00000.tar").stat().st_mtime_ns == before


def test_latent_shards_hold_the_samples_the_loader_takes_from_the_images(models, tmp_path):
    """Same shards, same samples, whether the loader reads the images or the latents made from them:
    precompute keeps and drops samples by the loader's rules (captions from the .txt only, a json that
    does not parse read as {}), and counts the dropped ones as the loader does."""
    vae, _, _ = models
    write_synthetic_shards(tmp_path / "synth", num_shards=1, samples_per_shard=1, image_size=RESOLUTION)
    jpg = next(iter(read_shard(tmp_path / "synth" / "00000.tar").values()))["jpg"]
    samples = {"a": {"jpg": jpg, "txt": b"a red square", "json": b'{"caption": "a red square"}'},
               "b": {"jpg": jpg, "json": b'{"caption": "caption only in the json"}'},  # no .txt
               "c": {"jpg": jpg, "txt": b"bad json", "json": b"{not json"},
               "d": {"jpg": jpg, "txt": b" \n", "json": b"{}"},  # a blank caption
               "e": {"jpg": jpg, "txt": b"  padded  ", "json": b'{"aesthetic": 6.1}'},
               "f": {"txt": b"no image"}}
    (tmp_path / "images").mkdir()
    with tarfile.open(tmp_path / "images" / "00000.tar", "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = PrecomputeConfig(resolution=RESOLUTION, batch_size=4, text=False, decode_workers=1)
    report = precompute_shards(tmp_path / "images", tmp_path / "latents", vae, config=cfg, progress=False)

    def loader_reads(path, latents):
        counts = Counter()
        got = [(c.key, c.caption, c.meta) for c in read_candidates(str(path), 0, None, latents, False, counts,
                                                                   latent_size=RESOLUTION // 8 if latents else None)]
        return got, counts

    from_images, skipped = loader_reads(tmp_path / "images" / "00000.tar", False)
    assert [key for key, _, _ in from_images] == ["a", "c", "e"]
    assert loader_reads(tmp_path / "latents" / "00000.tar", True) == (from_images, Counter())
    assert report.dropped == dict(skipped) == {"no_caption": 2, "no_image": 1}


def test_latents_only_and_parts(models, tmp_path):
    vae, _, _ = models
    src = tmp_path / "images"
    write_synthetic_shards(src, num_shards=3, samples_per_shard=2, image_size=RESOLUTION, seed=4)
    written = []
    for index in range(2):
        cfg = PrecomputeConfig(resolution=RESOLUTION, text=False, part=(index, 2), decode_workers=1)
        report = precompute_shards(src, tmp_path / "latents", vae, config=cfg, progress=False)
        written += [p.rsplit("/", 1)[-1] for p in report.shards_written]
    assert sorted(written) == ["00000.tar", "00001.tar", "00002.tar"] and written[:2] == ["00000.tar", "00002.tar"]
    assert (tmp_path / "latents.precompute-1-of-2.json").is_file()
    sample = next(iter(read_shard(tmp_path / "latents" / "00001.tar").values()))
    assert set(sample) == {"latent.npy", "txt", "json"}  # no context, and no __uncond__ member


def test_text_encoder_narrower_than_the_format_is_refused(tmp_path):
    vae, text_encoder = load_models(None, arch="tiny")  # tiny: 32-wide contexts
    src = tmp_path / "images"
    write_synthetic_shards(src, num_shards=1, samples_per_shard=1, image_size=RESOLUTION)
    with pytest.raises(ValueError, match="--no-text"):
        precompute_shards(src, tmp_path / "out", vae, text_encoder, CLIPTokenizer(),
                          PrecomputeConfig(resolution=RESOLUTION), progress=False)
    with pytest.raises(ValueError, match="multiple of 8"):
        PrecomputeConfig(resolution=100)


def test_the_next_batch_decodes_while_this_one_is_encoded(models, tmp_path, monkeypatch):
    """The GPU should not wait for JPEGs: batch k+1 is decoded while batch k is on the encoder. Each
    encode here waits (up to 10 s) for the next batch's decoding to begin, which only a pipeline gives."""
    import threading

    import data.precompute as precompute

    vae, _, _ = models
    src = tmp_path / "images"
    write_synthetic_shards(src, num_shards=1, samples_per_shard=6, image_size=RESOLUTION, seed=5)
    started = [threading.Event() for _ in range(4)]  # batch k's decoding has begun
    prepare, encode = precompute._prepare, precompute._Encoder.encode_images
    calls = iter(range(4))
    overlapped = []

    def recording_prepare(pending, resolution, pool):
        started[next(calls)].set()
        return prepare(pending, resolution, pool)

    def waiting_encode(self, images):
        k = len(overlapped)
        overlapped.append(started[k + 1].wait(timeout=10) if k < 2 else True)  # the last batch has no next
        return encode(self, images)

    monkeypatch.setattr(precompute, "_prepare", recording_prepare)
    monkeypatch.setattr(precompute._Encoder, "encode_images", waiting_encode)
    cfg = PrecomputeConfig(resolution=RESOLUTION, batch_size=2, text=False, decode_workers=1)
    report = precompute_shards(src, tmp_path / "latents", vae, config=cfg, progress=False)
    assert report.samples_written == 6 and overlapped == [True, True, True]
    assert list(read_shard(tmp_path / "latents" / "00000.tar")) == list(read_shard(src / "00000.tar"))


def test_inputs_take_the_brace_patterns_stage_data_shards_takes(tmp_path):
    """The README's `python -m data precompute 'shards/{00000..00099}.tar'`: quoted, the shell leaves the
    braces to us (and a chain's stage.data.precompute_from is such a pattern)."""
    from data.__main__ import main as data_main

    write_synthetic_shards(tmp_path / "images", num_shards=3, samples_per_shard=1, image_size=RESOLUTION)
    pattern = f"{tmp_path}/images/{{00000..00001}}.tar"
    assert [s.name for s in list_shards(pattern)] == ["00000.tar", "00001.tar"]
    with pytest.raises(FileNotFoundError, match="00003.tar: no such shard"):
        list_shards(f"{tmp_path}/images/{{00002..00003}}.tar")
    assert data_main(["precompute", pattern, "--out", str(tmp_path / "latents"), "--random", "--arch", "tiny",
                      "--resolution", str(RESOLUTION), "--no-text", "--decode-workers", "1", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == ["00000.tar", "00001.tar"]


def test_part_and_gpu_from_the_launcher_environment(monkeypatch):
    assert part_from_env({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (3, 8)
    assert part_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16"}) == (5, 16)
    with pytest.raises(ValueError, match="give --part I/N"):
        part_from_env({})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert local_device("cuda", {"SLURM_LOCALID": "6"}) == "cuda:6"
    assert local_device("cuda", {"LOCAL_RANK": "2", "SLURM_LOCALID": "0"}) == "cuda:2"
    assert local_device("cuda:1", {"LOCAL_RANK": "2"}) == "cuda:1" and local_device("cpu", {"LOCAL_RANK": "2"}) == "cpu"
    assert local_device("cuda", {}) == "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun bound one GPU to the task
    assert local_device("cuda", {"SLURM_LOCALID": "6"}) == "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="one process per GPU"):
        local_device("cuda", {"LOCAL_RANK": "4"})
