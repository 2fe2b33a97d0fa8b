"""Bad data never crashes the loader and is never lost silently: each case is skipped and counted
under its reason, also behind `pipe:` URLs and across an exact resume."""
import gzip
import io
import json
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from data.filters_runtime import stage_filter
from data.loader import LoaderConfig, ShardLoader
from data.samples import Decoder, read_candidates
from data.synth import write_synthetic_shards

PER_SHARD = 6


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def write_tar(path: Path, items: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    paths = write_synthetic_shards(root, 8, PER_SHARD, image_size=40)
    # Shard 4: cut in the middle of sample 3's image -> samples 0..2 survive.
    raw = paths[4].read_bytes()
    cut = raw.index(b"000040003.jpg") + 512 + 300
    paths[4].write_bytes(raw[:cut])
    # Shard 5: sample 1 a corrupt JPEG, sample 2 no caption, sample 3 an empty caption, sample 4 no image.
    items = []
    for name, data in members(paths[5]):
        if name == "000050001.jpg":
            data = data[:200] + b"\x00" * 50
        if name in ("000050002.txt", "000050004.jpg"):
            continue
        if name == "000050003.txt":
            data = b"  \n"
        items.append((name, data))
    write_tar(paths[5], items)
    write_tar(paths[6], [])  # img2dataset's shard whose URLs all failed: an empty 10 KiB tar
    paths[7].unlink()  # a missing shard
    urls = [str(p) for p in paths[:3]] + [f"pipe:cat {paths[3]}", str(paths[4]), str(paths[5]), str(paths[6]),
                                          str(paths[7]), f"pipe:cat {root}/no-such-shard.tar"]
    good = {f"0000{s}{i:04d}" for s in range(4) for i in range(PER_SHARD)}
    good |= {"000040000", "000040001", "000040002", "000050000", "000050005"}
    return {"urls": urls, "good": good, "root": root,
            "per_epoch": {"truncated_tar": 1, "corrupt_image": 1, "no_caption": 2, "no_image": 1,
                          "empty_shard": 1, "unreadable_shard": 2}}


def read_all(url: str) -> tuple[list[str], Counter]:
    counts = Counter()
    decode = Decoder(seed=0, resolution=32, crop="center", caption_dropout=0.0, latents=False, context=False)
    keys = [c.key for c in read_candidates(url, 0, None, False, False, counts) if decode(0, c, counts)]
    return keys, counts


def test_each_case_is_counted_under_its_reason(dataset):
    urls = dataset["urls"]
    assert read_all(urls[3]) == ([f"00003{i:04d}" for i in range(PER_SHARD)], Counter())  # pipe:cat
    assert read_all(urls[4]) == (["000040000", "000040001", "000040002"], Counter(truncated_tar=1))
    assert read_all(urls[5]) == (["000050000", "000050005"], Counter(corrupt_image=1, no_caption=2, no_image=1))
    assert read_all(urls[6]) == ([], Counter(empty_shard=1))
    assert read_all(urls[7]) == ([], Counter(unreadable_shard=1))
    assert read_all(urls[8]) == ([], Counter(unreadable_shard=1))  # the command fails
    root = dataset["root"]
    cut = f"pipe:head -c 3000 {root}/00000.tar"  # the command succeeds, the tar is short
    assert read_all(cut)[1] == Counter(truncated_tar=1)
    (root / "gzipped.tar.gz").write_bytes(gzip.compress((root / "00001.tar").read_bytes()))
    assert read_all(str(root / "gzipped.tar.gz"))[0] == [f"00001{i:04d}" for i in range(PER_SHARD)]
    (root / "garbage.tar").write_bytes(b"\x01" * 5000)
    assert read_all(str(root / "garbage.tar")) == ([], Counter(unreadable_shard=1))


@pytest.mark.parametrize("where", ["at a header", "header+100", "header+511", "one zero block"])
def test_a_tar_cut_at_or_inside_a_header_is_counted_not_taken_for_its_end(dataset, where, tmp_path):
    """tarfile takes a missing, short or unreadable header for the end of the archive; only tar's end
    marker (two zero blocks) may end it, or the rest of the shard would be lost uncounted."""
    whole = dataset["root"] / "00001.tar"
    with tarfile.open(whole) as tar:
        infos = tar.getmembers()
        members_end = tar.offset  # after the last member, where the end marker begins
    header = next(m.offset for m in infos if m.name == "000010003.jpg")
    cut = {"at a header": header, "header+100": header + 100, "header+511": header + 511,
           "one zero block": members_end + 512}[where]
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:cut])
    # The sample being assembled when the tar ends may lack members: dropped, as for any cut.
    kept = [f"00001{i:04d}" for i in range(5 if where == "one zero block" else 2)]
    for url in (str(tmp_path / "cut.tar"), f"pipe:head -c {cut} {whole}"):
        assert read_all(url) == (kept, Counter(truncated_tar=1)), url
    for url in (str(whole), f"pipe:head -c {members_end + 1024} {whole}"):  # the marker without the padding
        assert read_all(url) == ([f"00001{i:04d}" for i in range(PER_SHARD)], Counter()), url


def test_loader_skips_and_counts_without_crashing(dataset):
    cfg = LoaderConfig(shards=tuple(dataset["urls"]), resolution=32, batch_size=2, num_workers=2,
                       shards_per_group=2, shuffle_buffer=4, timeout_s=60)
    loader = ShardLoader(cfg)
    it = iter(loader)
    keys = [k for _ in range(45) for k in next(it)["keys"]]  # 90 samples: 3 epochs of the 29 good ones
    it.close()
    assert set(keys) == dataset["good"]
    counts = loader.skip_counts()
    assert set(counts) == set(dataset["per_epoch"])
    for reason, n in dataset["per_epoch"].items():  # each stream is in its 2nd to 4th epoch by now
        assert n <= counts[reason] <= 4 * n, reason


def test_resume_with_bad_data_keeps_samples_and_counts_exact(dataset):
    cfg = LoaderConfig(shards=tuple(dataset["urls"]), resolution=32, batch_size=3, num_workers=2,
                       shards_per_group=3, shuffle_buffer=4, caption_dropout=0.2, timeout_s=60)
    straight = ShardLoader(cfg)
    it = iter(straight)
    expected = [next(it)["keys"] for _ in range(16)]
    it.close()
    first = ShardLoader(cfg)
    it = iter(first)
    got = [next(it)["keys"] for _ in range(7)]
    it.close()
    second = ShardLoader(cfg)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    it = iter(second)
    got += [next(it)["keys"] for _ in range(9)]
    it.close()
    assert got == expected
    assert second.skip_counts() == straight.skip_counts()


def test_no_usable_shard_at_all_raises_instead_of_hanging(dataset):
    urls = dataset["urls"][6:]  # empty, missing, failing command
    loader = ShardLoader(LoaderConfig(shards=tuple(urls), resolution=32, num_workers=0))
    with pytest.raises(RuntimeError, match="none of the 3 shards"):
        next(iter(loader))
    strict = LoaderConfig(shards=tuple(dataset["urls"][:3]), resolution=32, num_workers=0,
                          filters=replace(stage_filter("laion2b-en"), min_width=100_000))
    with pytest.raises(RuntimeError, match="filter_min_width"):
        next(iter(ShardLoader(strict)))


def test_many_unreadable_shards_in_a_row_stop_the_stream_with_the_error(dataset, tmp_path):
    """Access failing (credentials, a mount) makes every shard unreadable: the stream stops after
    `max_unreadable_in_a_row` of them and says why, where it would try ~N ln N shards before the rule above."""
    bad = []
    for i in range(40):
        bad.append(tmp_path / f"denied-{i:02d}.tar")
        bad[-1].write_bytes(b"<Error><Code>ExpiredToken</Code></Error>")  # what a failed fetch leaves
    urls = (dataset["urls"][0], *map(str, bad))
    cfg = LoaderConfig(shards=urls, resolution=32, batch_size=2, num_workers=0, max_unreadable_in_a_row=8)
    it = iter(ShardLoader(cfg))
    with pytest.raises(RuntimeError, match=r"\d+ shards in a row could not be read.*the last: .*denied-\d\d.tar: "
                                           r"ReadError.*stage.data.max_unreadable_in_a_row"):
        for _ in range(30):  # 3 batches an epoch from the good shard; a streak of 8 comes within the first epochs
            next(it)
    # The same shards without the limit: the one good shard feeds the stream, the others are skipped.
    it = iter(ShardLoader(replace(cfg, max_unreadable_in_a_row=0)))
    assert [len(next(it)["keys"]) for _ in range(30)] == [2] * 30


def test_a_usable_sample_ends_the_unreadable_streak(dataset, tmp_path):
    # One good shard among 6 unreadable: a streak spans at most the 6 after it in one epoch and the 6 before it
    # in the next, so a limit of 13 is never reached, however long the stream reads.
    urls = (dataset["urls"][0], *[str(tmp_path / f"missing-{i}.tar") for i in range(6)])
    it = iter(ShardLoader(LoaderConfig(shards=urls, resolution=32, batch_size=2, num_workers=0, shards_per_group=1,
                                       max_unreadable_in_a_row=13)))
    assert [len(next(it)["keys"]) for _ in range(60)] == [2] * 60  # 20 epochs of the good shard
