"""The parquet filter and the stage rules: exact per-rule counts on generated LAION-like metadata
(boundary values, nulls and NaNs included), the exact kept set, agreement between the vectorised
and the per-sample evaluation, sharded outputs, and memory that does not grow with the row count."""
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.filter import REPORT_NAME, filter_parquet
from data.stages import STAGES, MetadataColumns, SubsetFilter, get_stage

RULES = SubsetFilter(min_width=512, min_height=512, min_aesthetic=5.0, max_pwatermark=0.5, max_punsafe=0.1,
                     min_caption_length=5, max_caption_length=40, languages=("en", "de"), min_similarity=0.28)
FILE_ROWS = (3000, 3500, 3500)


def make_metadata(seed: int = 0, n: int = sum(FILE_ROWS)):
    """A LAION-like table with an `id` column, and per rule the ids that must fail it and the ids
    whose value is null/NaN (a subset of the failing ones)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n)
    fail, null = {}, {}

    def pick(p, among=None):
        among = ids if among is None else among
        return set(among[rng.random(len(among)) < p].tolist())

    def numeric(rule, passing, failing, p_fail, p_null, as_int=False):
        f = pick(p_fail)
        nl = pick(p_null / p_fail, np.array(sorted(f)))
        fail[rule], null[rule] = f, nl
        values = []
        for i in range(n):
            if i in nl:
                # Integers can only be null; floats alternate between null and NaN.
                values.append(None if as_int or i % 2 else math.nan)
            else:
                pool = failing if i in f else passing
                values.append(pool[i % len(pool)])
        return values

    cols = {"id": ids.tolist()}
    cols["WIDTH"] = numeric("min_width", [512, 513, 1024, 4000], [0, 1, 300, 511], 0.10, 0.01, as_int=True)
    cols["HEIGHT"] = numeric("min_height", [512, 700, 2048], [12, 511], 0.08, 0.01, as_int=True)
    cols["aesthetic"] = numeric("min_aesthetic", [5.000001, 5.5, 7.9], [5.0, 4.99, 1.0], 0.30, 0.02)
    cols["pwatermark"] = numeric("max_pwatermark", [0.0, 0.1, 0.499999], [0.5, 0.51, 1.0], 0.15, 0.01)
    cols["punsafe"] = numeric("max_punsafe", [0.0, 0.05, 0.0999], [0.1, 0.2, 0.99], 0.05, 0.005)
    cols["similarity"] = numeric("min_similarity", [0.28, 0.3, 0.41], [0.2799, 0.1, -0.05], 0.12, 0.01)

    # Captions: too short, too long, null (fails both length rules) or fine. Lengths count code points:
    # "ééééé" is 5 characters in 10 UTF-8 bytes and passes min_caption_length=5.
    kind = rng.choice(["short", "long", "null", "ok"], size=n, p=[0.05, 0.04, 0.01, 0.90])
    ok_caps, short_caps, long_caps = ["ééééé", "a cat on a mat", "x" * 40], ["", "abcd", "日本語"], ["y" * 41, "é" * 60]
    captions = []
    for i in range(n):
        pool = {"ok": ok_caps, "short": short_caps, "long": long_caps}.get(kind[i])
        captions.append(None if pool is None else pool[i % len(pool)])
    cols["TEXT"] = captions
    null["min_caption_length"] = null["max_caption_length"] = set(ids[kind == "null"].tolist())
    fail["min_caption_length"] = set(ids[(kind == "short") | (kind == "null")].tolist())
    fail["max_caption_length"] = set(ids[(kind == "long") | (kind == "null")].tolist())

    lang_kind = rng.choice(["en", "de", "fr", "EN", None], size=n, p=[0.6, 0.2, 0.1, 0.05, 0.05])
    cols["LANGUAGE"] = [None if k is None else str(k) for k in lang_kind]
    fail["languages"] = {i for i in range(n) if cols["LANGUAGE"][i] not in ("en", "de")}  # exact match: "EN" fails
    null["languages"] = {i for i in range(n) if cols["LANGUAGE"][i] is None}
    cols["URL"] = [f"https://example.com/{i}.jpg" for i in range(n)]

    schema = pa.schema([("id", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()),
                        ("HEIGHT", pa.int64()), ("similarity", pa.float64()), ("punsafe", pa.float64()),
                        ("pwatermark", pa.float64()), ("aesthetic", pa.float32()), ("LANGUAGE", pa.string())])
    return pa.table({f.name: cols[f.name] for f in schema}, schema=schema), fail, null


def write_files(table: pa.Table, directory, sizes=FILE_ROWS, row_group_size=1000):
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        pq.write_table(table.slice(start, size), directory / f"part-{i}.parquet", row_group_size=row_group_size)
        start += size
    return directory


@pytest.fixture(scope="module")
def metadata():
    return make_metadata()


def read_ids(paths):
    return [i for p in paths for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def test_counts_per_rule_and_kept_set_are_exact(metadata, tmp_path):
    table, fail, null = metadata
    src = write_files(table, tmp_path / "in")
    report = filter_parquet(src, tmp_path / "out", RULES, batch_size=256, progress=False)

    removed = set().union(*fail.values())
    expected_kept = [i for i in range(table.num_rows) if i not in removed]
    # Every rule removes something, and rows failing several rules exist (so the counting matters).
    assert all(fail[r] for r in fail) and sum(map(len, fail.values())) > len(removed)
    assert report.rows_in == 10_000 and report.rows_out == len(expected_kept)
    assert report.rows_removed == len(removed)
    assert report.removed_by_rule == {r: len(fail[r]) for r in RULES.active_rules()}
    assert report.null_by_rule == {r: len(null[r]) for r in RULES.active_rules()}
    only = {r: len(fail[r] - set().union(*(fail[s] for s in fail if s != r))) for r in fail}
    assert report.removed_only_by_rule == {r: only[r] for r in RULES.active_rules()}

    # One output per input, same order, every column kept, exactly the expected rows.
    assert [o["rows"] for o in report.outputs] == [i["kept"] for i in report.inputs]
    outputs = [o["path"] for o in report.outputs]
    assert read_ids(outputs) == expected_kept
    kept = pa.concat_tables([pq.read_table(p) for p in outputs])
    assert kept.schema.names == table.schema.names
    assert kept.equals(table.take(pa.array(expected_kept)))

    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert saved["rows_removed"] == len(removed) and saved["removed_by_rule"] == report.removed_by_rule
    assert "counted under each rule" in saved["counting"] and "null" in saved["nulls"]


def test_per_sample_rules_agree_with_parquet_filter(metadata):
    table, fail, _ = metadata
    for row in table.to_pylist():
        expected = [r for r in RULES.active_rules() if row["id"] in fail[r]]
        assert RULES.failed_rules(row) == expected, row


def test_rows_per_file_columns_and_overwrite(metadata, tmp_path):
    table, fail, _ = metadata
    src = write_files(table, tmp_path / "in")
    rules = SubsetFilter(min_aesthetic=5.0)
    report = filter_parquet(src, tmp_path / "out", rules, batch_size=333, rows_per_file=2000, row_group_rows=700,
                            columns=["id", "URL", "TEXT"], progress=False)
    expected = [i for i in range(table.num_rows) if i not in fail["min_aesthetic"]]
    rows = [o["rows"] for o in report.outputs]
    assert sum(rows) == len(expected) and all(r == 2000 for r in rows[:-1]) and 0 < rows[-1] <= 2000
    assert read_ids(o["path"] for o in report.outputs) == expected
    first = pq.ParquetFile(report.outputs[0]["path"])
    assert first.schema_arrow.names == ["id", "URL", "TEXT"]
    assert max(first.metadata.row_group(i).num_rows for i in range(first.num_row_groups)) <= 700

    with pytest.raises(FileExistsError, match="--overwrite"):
        filter_parquet(src, tmp_path / "out", rules, progress=False)
    again = filter_parquet(src, tmp_path / "out", SubsetFilter(), overwrite=True, progress=False)
    assert again.rows_out == 10_000 and len(list((tmp_path / "out").glob("*.parquet"))) == 3


def test_memory_does_not_grow_with_rows(tmp_path):
    """Peak arrow allocation over a 5x larger input, read in 500-row batches, stays about the same and
    far below the size of the data. (With pyarrow's default pre_buffer=True the peak is the file size.)"""
    peaks = {}
    for n in (10_000, 50_000):
        table, _, _ = make_metadata(seed=1, n=n)
        src = write_files(table, tmp_path / f"in{n}", sizes=(n,), row_group_size=1000)
        report = filter_parquet(src, tmp_path / f"out{n}", RULES, batch_size=500, row_group_rows=1000, progress=False)
        assert report.rows_in == n
        peaks[n] = (report.peak_arrow_bytes, table.nbytes)
        del table
    (small, _), (large, large_bytes) = peaks[10_000], peaks[50_000]
    assert large < 1.2 * small + (256 << 10), peaks
    assert large < large_bytes / 4, peaks


def test_the_aesthetic_score_is_read_under_either_name_the_subsets_use(tmp_path):
    """laion-aesthetics v2 5+ calls it `aesthetic`, the 6+ subsets and some mirrors `AESTHETIC_SCORE`; the
    loader reads either (test_data_loader), and so does the metadata filter, per file, saying which it read."""
    pq.write_table(pa.table({"URL": ["u", "v", "w"], "AESTHETIC_SCORE": [6.0, 4.0, 5.5]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"URL": ["x", "y"], "aesthetic": [5.0, 7.0]}), tmp_path / "b.parquet")
    report = filter_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "out",
                            SubsetFilter(min_aesthetic=5.0), progress=False)
    assert [(i["rows"], i["kept"], i.get("columns_read")) for i in report.inputs] == [
        (3, 2, {"aesthetic": "AESTHETIC_SCORE"}), (2, 1, None)]
    kept = pa.concat_tables([pq.read_table(f["path"]) for f in report.outputs], promote_options="permissive")
    assert sorted(kept.column("URL").to_pylist()) == ["u", "w", "y"]
    # Selected output columns read the score under the file's name too.
    report = filter_parquet(tmp_path / "a.parquet", tmp_path / "out2", SubsetFilter(min_aesthetic=5.0),
                            columns=["URL"], progress=False)
    assert report.rows_out == 2


def test_a_refused_run_leaves_nothing_that_blocks_the_next(tmp_path):
    """A run refused at its first batch left 00000.parquet.tmp behind, and the corrected command was then
    refused too ('already holds 1 parquet files; pass --overwrite'). Finished outputs still count."""
    pq.write_table(pa.table({"URL": ["u", "v"], "TEXT": ["a", "b"], "score": [6.0, 4.0]}), tmp_path / "a.parquet")
    with pytest.raises(KeyError, match="no column 'aesthetic'"):
        filter_parquet(tmp_path / "a.parquet", tmp_path / "out", SubsetFilter(min_aesthetic=5.0), progress=False)
    assert list((tmp_path / "out").iterdir()) == []
    renamed = SubsetFilter(min_aesthetic=5.0, columns=MetadataColumns(aesthetic="score"))
    assert filter_parquet(tmp_path / "a.parquet", tmp_path / "out", renamed, progress=False).rows_out == 1
    # The second input lacks the column: the first's output stays, the second's partial file goes.
    pq.write_table(pa.table({"URL": ["w"], "TEXT": ["c"]}), tmp_path / "b.parquet")
    with pytest.raises(KeyError, match="no column 'score'"):
        filter_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "out2", renamed, progress=False)
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["00000.parquet"]


def test_missing_column_and_bad_types_say_what_to_change(tmp_path):
    pq.write_table(pa.table({"URL": ["u"], "TEXT": ["a caption"], "score": [6.0]}), tmp_path / "a.parquet")
    # The message names the rule's own flag (it said --width-col for every rule) and the score's other name.
    with pytest.raises(KeyError, match="no column 'aesthetic' or 'AESTHETIC_SCORE' for rule min_aesthetic.*"
                                       r"field, aesthetic \(--aesthetic-col NAME\)"):
        filter_parquet(tmp_path / "a.parquet", tmp_path / "out", SubsetFilter(min_aesthetic=5.0), progress=False)
    with pytest.raises(KeyError, match=r"no column 'WIDTH' for rule min_width.*field, width \(--width-col NAME\)"):
        filter_parquet(tmp_path / "a.parquet", tmp_path / "out1", SubsetFilter(min_width=5), progress=False)
    renamed = SubsetFilter(min_aesthetic=5.0, columns=MetadataColumns(aesthetic="score"))
    assert filter_parquet(tmp_path / "a.parquet", tmp_path / "out2", renamed, progress=False).rows_out == 1
    with pytest.raises(KeyError, match="SubsetFilter.columns"):
        SubsetFilter(min_aesthetic=5.0).failed_rules({"URL": "u"})
    pq.write_table(pa.table({"WIDTH": ["1024"]}), tmp_path / "s.parquet")
    with pytest.raises(TypeError, match="needs numbers"):
        filter_parquet(tmp_path / "s.parquet", tmp_path / "out3", SubsetFilter(min_width=10), progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_pwatermark=0.0), r"\(0, 1\]"),
    (dict(min_caption_length=10, max_caption_length=5), "no caption could pass"),
    (dict(languages="en"), "tuple of codes"),
    (dict(min_width=-1), "non-negative"),
    (dict(min_similarity=2.0), r"\[-1, 1\]"),
])
def test_invalid_rules_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubsetFilter(**kwargs)


def test_stage_presets_follow_the_model_card():
    assert set(STAGES) == {"laion2b-en", "laion-high-resolution", "laion-improved-aesthetics"}
    assert get_stage("laion2b-en").filter.active_rules() == [] and get_stage("laion2b-en").image_size == 256
    hires = get_stage("laion-high-resolution")
    assert hires.image_size == 512 and hires.filter.active_rules() == ["min_width", "min_height"]
    assert hires.filter.accepts({"WIDTH": 1024, "HEIGHT": 1024}) and not hires.filter.accepts({"WIDTH": 1023, "HEIGHT": 4096})
    aes = get_stage("laion-improved-aesthetics").filter
    row = {"WIDTH": 512, "HEIGHT": 512, "aesthetic": 5.0001, "pwatermark": 0.4999}
    assert aes.failed_rules(row) == []
    assert aes.failed_rules(row | {"aesthetic": 5.0, "pwatermark": 0.5}) == ["min_aesthetic", "max_pwatermark"]
    assert aes.failed_rules(row | {"aesthetic": None, "HEIGHT": 511}) == ["min_height", "min_aesthetic"]
    # The same preset on img2dataset's per-sample json (decoded size, renamed url/caption).
    on_json = aes.with_columns(MetadataColumns.img2dataset_json())
    assert on_json.accepts({"original_width": 600, "original_height": 512, "aesthetic": 6.0, "pwatermark": 0.1})
    with pytest.raises(ValueError, match="choose one of"):
        get_stage("laion-aesthetics")
