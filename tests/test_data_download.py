"""img2dataset end to end, in its own virtual environment, against a local HTTP server.

The server (127.0.0.1, a thread of this process) serves generated images of several sizes and
modes, an HTML page, truncated JPEGs and an empty file; the URL list also has 404s and a port
nothing listens on. The shards must hold exactly the images that should survive, cropped to the
stage size, with their LAION columns in the json; the report must count every failure by message;
a re-run must download nothing; a shard whose stats file is gone must be redone, alone.

The img2dataset environment is created once per machine (data.download.default_env_path(), or
$SD_REPRO_IMG2DATASET_ENV) and reused; from scratch it needs PyPI and takes ~30 s with a warm pip
cache, a few minutes without.
"""
import functools
import io
import json
import tarfile
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.download import EMPTY_TAR_BYTES, DownloadConfig, create_env, default_env_path, download, summarize
from data.stages import get_stage

pytestmark = pytest.mark.slow
SIZE = 64
MIN_SIDE = 50
# (name, size, colour): solid colours identify which image ended up under which key.
IMAGES = [
    ("landscape.jpg", (640, 480), (200, 30, 30)),
    ("portrait.jpg", (300, 500), (30, 200, 30)),
    ("exact_min.png", (MIN_SIDE, 90), (30, 30, 200)),  # shorter side == min_image_size: kept (and upscaled)
    ("rgba.png", (120, 120), (250, 200, 0)),
    ("gray.jpg", (200, 100), (128, 128, 128)),
    ("wide.jpg", (2000, 200), (0, 160, 160)),
]
# (name, expected status, a substring of img2dataset's error message)
BROKEN = [
    ("small.jpg", "failed_to_resize", "image too small"),  # 40x30 < min_image_size
    ("page.html", "failed_to_resize", "Image decoding error"),
    ("header_only.jpg", "failed_to_resize", "Image decoding error"),
    ("half.jpg", "failed_to_resize", "Image decoding error"),  # opencv 4.14 rejects a half JPEG
    ("empty.jpg", "failed_to_resize", "!buf.empty()"),  # OpenCV's assertion text, not img2dataset's
    ("missing.jpg", "failed_to_download", "HTTP Error 404: File not found"),
    ("gone/x.jpg", "failed_to_download", "HTTP Error 404: File not found"),
]
REFUSED = "http://127.0.0.1:9/refused.jpg"  # discard port: nothing listens there
REFUSED_ERROR = ("failed_to_download", "Connection refused")


def _jpeg(size, colour, mode="RGB", fmt="JPEG"):
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode != "L" else colour[0]).save(buf, fmt, quality=95)
    return buf.getvalue()


def write_site(www):
    www.mkdir()
    for name, size, colour in IMAGES:
        if name.endswith(".png"):
            mode = "RGBA" if name.startswith("rgba") else "RGB"
            data = _jpeg(size, colour + ((255,) if mode == "RGBA" else ()), mode, "PNG")
        else:
            data = _jpeg(size, colour, "L" if name.startswith("gray") else "RGB")
        (www / name).write_bytes(data)
    whole = _jpeg((400, 300), (10, 10, 10))
    (www / "small.jpg").write_bytes(_jpeg((40, 30), (1, 2, 3)))
    (www / "page.html").write_text("<!doctype html><html><body><img src='landscape.jpg'></body></html>")
    (www / "header_only.jpg").write_bytes(whole[:300])
    (www / "half.jpg").write_bytes(whole[:len(whole) // 2])
    (www / "empty.jpg").write_bytes(b"")


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]
    timeout = 10  # a stuck client cannot hold a server thread for longer

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    www = tmp_path / "www"
    write_site(www)
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture(scope="session")
def img2dataset_env():
    start = time.monotonic()
    path = create_env(default_env_path())
    print(f"\nimg2dataset env ready at {path} in {time.monotonic() - start:.1f}s")
    return path


def url_rows(base):
    """The URL list in the order img2dataset shards it (4 rows per shard): shard 0: 4 good;
    shard 1: 1 good + 2 broken + the refused port; shard 2: 4 broken (an empty shard); shard 3: 1 broken + 1 good."""
    good = [f"{base}/{name}" for name, _, _ in IMAGES]
    broken = [f"{base}/{name}" for name, _, _ in BROKEN]
    urls = good[:4] + [good[4]] + broken[:2] + [REFUSED] + broken[2:6] + [broken[6], good[5]]
    return urls, set(good)


def write_url_list(directory, base):
    urls, good = url_rows(base)
    n = len(urls)
    table = pa.table({
        "URL": urls,
        "TEXT": [f"caption {i} of {url.rsplit('/', 1)[-1]}" for i, url in enumerate(urls)],
        "WIDTH": [1000 + i for i in range(n)],
        "HEIGHT": [float(700 + i) for i in range(n)],
        "similarity": [0.3 + i / 100 for i in range(n)],
        "punsafe": [i / 1000 for i in range(n)],
        "pwatermark": [None if i == 2 else i / 100 for i in range(n)],
        "aesthetic": [5.5 + i / 10 for i in range(n)],
    })
    directory.mkdir()
    # Two input files, as the filter writes them: shard ids continue across files.
    pq.write_table(table.slice(0, 8), directory / "00000.parquet")
    pq.write_table(table.slice(8), directory / "00001.parquet")
    return table, good


def read_tars(out):
    samples = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_download_end_to_end_and_resume(server, img2dataset_env, tmp_path, monkeypatch):
    base, requests = server
    # A proxy configured in the environment must not see 127.0.0.1 (urllib honours no_proxy).
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # download() puts img2dataset's TMPDIR under the temp dir and must leave nothing behind.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    table, good = write_url_list(tmp_path / "urls", base)
    config = DownloadConfig.for_stage(get_stage("laion2b-en"), image_size=SIZE, min_image_size=MIN_SIDE,
                                      number_sample_per_shard=4, processes_count=2, thread_count=4, timeout=5)
    out = tmp_path / "shards"

    start = time.monotonic()
    report = download(tmp_path / "urls", out, config, env_path=img2dataset_env, quiet=True, timeout_s=300)
    print(f"first run {time.monotonic() - start:.1f}s")
    assert list(scratch.iterdir()) == []

    rows = {row["URL"]: row for row in table.to_pylist()}
    samples = read_tars(out)
    assert {json.loads(s["json"])["url"] for s in samples.values()} == good
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        row = rows[meta["url"]]
        assert meta["key"] == key and sample["txt"].decode() == row["TEXT"] == meta["caption"]
        # Every LAION column rides along under its own name (URL/TEXT as url/caption), nulls included.
        assert {c: meta[c] for c in ("WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "aesthetic")} == \
            {c: row[c] for c in ("WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "aesthetic")}
        name = meta["url"].rsplit("/", 1)[-1]
        size, colour = next((s, c) for n, s, c in IMAGES if n == name)
        assert (meta["original_width"], meta["original_height"]) == size
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.size == (SIZE, SIZE) and (meta["width"], meta["height"]) == (SIZE, SIZE)
        np.testing.assert_allclose(np.asarray(image.convert("RGB")).reshape(-1, 3).mean(0), colour, atol=4)
    # Keys are shard id + row index: the URL at row i of the whole list is key f"{i // 4:05d}{i % 4}".
    urls = list(rows)
    assert {k: json.loads(s["json"])["url"] for k, s in samples.items()} == \
        {f"{i // 4:05d}{i % 4}": u for i, u in enumerate(urls) if u in good}

    expected = [(status, part) for _, status, part in BROKEN] + [REFUSED_ERROR]
    assert report.urls == len(urls) and report.successes == len(good) == report.samples_in_tars
    assert report.failed_to_download == sum(s == "failed_to_download" for s, _ in expected) == 3
    assert report.failed_to_resize == sum(s == "failed_to_resize" for s, _ in expected) == 5
    by_part = {}
    for message, count in report.errors.items():
        (part,) = {p for _, p in expected if p in message}  # each message is one of the expected kinds
        by_part[part] = by_part.get(part, 0) + count
    assert by_part == {p: sum(q == p for _, q in expected) for _, p in expected}
    assert report.shards == 4 and report.empty_shards == ["00002"] and report.unfinished_shards == []
    assert (out / "00002.tar").stat().st_size == EMPTY_TAR_BYTES
    saved = json.loads((tmp_path / "shards.download.json").read_text())
    assert saved["successes"] == len(good) and saved["config"]["resize_mode"] == "center_crop"

    # Re-running is incremental: every shard has its stats file, so nothing is fetched again.
    served = len(requests)
    tars = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    again = download(tmp_path / "urls", out, config, env_path=img2dataset_env, quiet=True, timeout_s=300)
    assert len(requests) == served and {p.name: p.read_bytes() for p in out.glob("*.tar")} == tars
    assert again.to_dict() | {"wall_s": None} == report.to_dict() | {"wall_s": None}

    # A shard without its stats file (a run killed mid-shard) is downloaded again, and only it.
    (out / "00001_stats.json").unlink()
    assert summarize(out).unfinished_shards == ["00001"]
    third = download(tmp_path / "urls", out, config, env_path=img2dataset_env, quiet=True, timeout_s=300)
    assert sorted(requests[served:]) == sorted(u.removeprefix(base) for u in urls[4:8] if u.startswith(base))
    assert third.successes == len(good) and third.unfinished_shards == []


def test_config_validation_and_stage_mapping():
    hires = DownloadConfig.for_stage(get_stage("laion-high-resolution"))
    assert (hires.image_size, hires.min_image_size, hires.resize_mode) == (512, 1024, "center_crop")
    assert DownloadConfig.for_stage(get_stage("laion-improved-aesthetics")).min_image_size == 512
    assert DownloadConfig.for_stage(get_stage("laion2b-en")).min_image_size == 0
    with pytest.raises(ValueError, match="resize_mode"):
        DownloadConfig(resize_mode="crop")
    with pytest.raises(ValueError, match="remove them"):
        DownloadConfig(save_additional_columns=("URL", "status"))
    kwargs = DownloadConfig().img2dataset_kwargs("in", "out", ["URL", "TEXT", "WIDTH", "key", "aesthetic"])
    assert kwargs["save_additional_columns"] == ["WIDTH", "aesthetic"]  # reserved "key" left out
    assert kwargs["output_format"] == "webdataset" and kwargs["incremental_mode"] == "incremental"
    with pytest.raises(ValueError, match="url_col"):
        DownloadConfig().img2dataset_kwargs("in", "out", ["url", "TEXT"])
    with pytest.raises(ValueError, match="pyspark"):
        DownloadConfig(spark_master="spark://head:7077")
    spark = DownloadConfig(distributor="pyspark", spark_master="spark://head:7077",
                           spark_config=(("spark.executor.memory", "16G"),))
    assert spark.img2dataset_kwargs("in", "out", ["URL", "TEXT"])["_spark"] == \
        {"master": "spark://head:7077", "config": [["spark.executor.memory", "16G"]]}
