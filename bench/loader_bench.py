"""Images/s of data.loader.ShardLoader against a plain webdataset + PIL pipeline, per core.

    .venv/bin/python bench/loader_bench.py [--images 96] [--workers 0 1] [--repeats 3]

Data: the two real JPEG photographs scikit-learn ships (427x640), upscaled to LAION-like originals
(shorter side 1024..2048, varied aspect), each a different crop/flip with a little grain so the
JPEGs are not unrealistically smooth, written as img2dataset-style shards (jpg/txt/json).

Both pipelines: decode -> shorter-side resize (bicubic) -> centre crop -> float [-1, 1] batch of 8,
captions tokenised with the same CLIP tokenizer. The baseline decodes every image at full size
(webdataset's `.decode("pil")`); ours uses draft() DCT scaling and a crop-box resize
(data/transforms.py). Runs alternate and the best of --repeats is kept, since the machine is
shared. --workers 0 runs in the calling process: that is the per-core number.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from data.loader import LoaderConfig, ShardLoader, _tokenizer

BATCH = 8


def write_photo_shards(out: Path, num_images: int, per_shard: int = 16, seed: int = 0) -> list[str]:
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range((num_images + per_shard - 1) // per_shard):
        path = out / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(min(per_shard, num_images - shard * per_shard)):
                photo = photos[(shard * per_shard + i) % len(photos)]
                # A different crop of the photo each time, then up to a LAION "original" size.
                w, h = photo.size
                cw, ch = rng.randint(int(w * 0.7), w), rng.randint(int(h * 0.7), h)
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                short = rng.choice((1024, 1200, 1536, 2048))
                scale = short / min(cw, ch)
                image = photo.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
                if rng.random() < 0.5:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                grain = noise.normal(0, 2.0, (image.height, image.width, 1)).astype(np.float32)
                image = Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8))
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=95)
                key = f"{shard:05d}{i:04d}"
                caption = f"a photograph, variant {key}"
                meta = {"key": key, "caption": caption, "original_width": image.width, "original_height": image.height}
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def baseline_loader(urls: list[str], resolution: int, workers: int):
    tokenizer = _tokenizer()

    def transform(sample):
        image, caption = sample
        w, h = image.size
        s = resolution / min(w, h)
        image = image.convert("RGB").resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        return np.asarray(image), caption

    def collate(samples):
        images, captions = zip(*samples)
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return pixels, tokenizer(list(captions))

    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False)
               .repeat().decode("pil").to_tuple("jpg", "txt").map(transform).batched(BATCH, collation_fn=collate))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def ours_loader(urls: list[str], resolution: int, workers: int):
    return ShardLoader(LoaderConfig(shards=tuple(urls), resolution=resolution, batch_size=BATCH, num_workers=workers,
                                    shards_per_group=2, shuffle_buffer=64))


def write_latent_shards(out: Path, num_samples: int, latent: int, per_shard: int = 64) -> list[str]:
    """Precomputed-latent shards as `python -m data precompute` writes them (posterior mean and std, float16,
    plus the 77x768 text embedding and CLIP("") per shard), filled with random numbers."""
    from data.latent_format import LatentShardWriter

    rng = np.random.default_rng(0)
    uncond = rng.standard_normal((77, 768), dtype=np.float32)
    urls = []
    for shard in range(0, num_samples, per_shard):
        path = out / f"latents-{latent}-{shard // per_shard:05d}.tar"
        with LatentShardWriter(path, uncond_context=uncond) as writer:
            for i in range(shard, min(shard + per_shard, num_samples)):
                writer.write(f"{i:09d}", rng.standard_normal((4, latent, latent), dtype=np.float32),
                             np.abs(rng.standard_normal((4, latent, latent), dtype=np.float32)) * 0.1,
                             f"caption {i}", {"key": f"{i:09d}"}, context=rng.standard_normal((77, 768), dtype=np.float32))
        urls.append(str(path))
    return urls


def latent_samples_per_s(urls: list[str], latent: int, workers: int, batches: int) -> float:
    loader = ShardLoader(LoaderConfig(shards=tuple(urls), resolution=latent * 8, batch_size=BATCH, num_workers=workers,
                                      shards_per_group=2, shuffle_buffer=64, latents=True, context=True,
                                      caption_dropout=0.1))
    return images_per_s(loader, batches)


def images_per_s(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # worker start, tokenizer, first shard open: not what is measured
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    del it
    return batches * BATCH / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent-samples", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_photo_shards(args.out or Path(tmp), args.images)
        batches = args.images // BATCH  # one pass over the data per measurement
        print(f"{len(urls)} shards, {args.images} images (shorter side 1024-2048), batch {BATCH}")
        for workers in args.workers:
            for resolution in args.resolutions:
                best = {"ours": 0.0, "baseline": 0.0}
                for _ in range(args.repeats):
                    best["baseline"] = max(best["baseline"], images_per_s(baseline_loader(urls, resolution, workers), batches))
                    best["ours"] = max(best["ours"], images_per_s(ours_loader(urls, resolution, workers), batches))
                print(f"workers={workers} res={resolution}: ours {best['ours']:.1f} img/s, "
                      f"webdataset+PIL {best['baseline']:.1f} img/s, ratio {best['ours'] / best['baseline']:.2f}x", flush=True)
        # Precomputed latents (+ text embeddings): what the GPU step reads when the VAE is not run online.
        for latent in (32, 64):
            latent_urls = write_latent_shards(args.out or Path(tmp), args.latent_samples, latent)
            for workers in args.workers:
                rate = max(latent_samples_per_s(latent_urls, latent, workers, args.latent_samples // BATCH)
                           for _ in range(args.repeats))
                print(f"workers={workers} latents {latent}x{latent} + context: {rate:.0f} samples/s", flush=True)


if __name__ == "__main__":
    main()
