"""Download a filtered LAION subset into WebDataset shards with img2dataset, then account for it.

img2dataset runs as a subprocess in a virtual environment of its own, never in the training one:
img2dataset 1.47 pins webdataset < 0.3 (training needs 1.0.2) and pulls in the PyPI `dataclasses`
backport, which shadows Python 3.11's own module and breaks imports (`typing._ClassVar`).
`create_env` builds that environment (`python -m data download-env --path .venv-img2dataset`) and
removes the backport. Each run gets NO_ALBUMENTATIONS_UPDATE=1 (albumentations otherwise calls the
network at import) and a private TMPDIR that is deleted afterwards (wandb, imported by
img2dataset, leaves empty `tmp*wandb-*` folders there).

Per shard img2dataset writes `NNNNN.tar` (`KEY.jpg`, `KEY.txt`, `KEY.json` with the saved metadata
columns), `NNNNN.parquet` (one row per URL, with `status` and `error_message`) and
`NNNNN_stats.json`. A shard whose URLs all failed still gets a tar, an empty 10 KiB one.
`summarize` reads those files back into a `DownloadReport` (successes, failures by error message,
empty shards, unfinished shards).

Keys are deterministic: the sample key is the shard id followed by the row's index in it, so a
given row of a given input gets the same key on every run. `incremental_mode="incremental"` skips
every shard that already has a `NNNNN_stats.json`, so re-running the same command resumes. Two
consequences: nothing else ending in `.json` may be put in the output folder (img2dataset parses
every `*.json` name there as a shard id), which is why the report is written next to it; and the
input must not change between runs, or the ids point at other rows.

Crop policy: SD v1's exact crop is not public; Stability's later training configs resize the shorter
side to the training size and centre-crop, which is the default here (`resize_mode="center_crop"`).
`keep_ratio` (shorter side resized, no crop) leaves cropping to the loader, at the cost of wide
shards: a 2000x200 image becomes 2560x256, so bound it with max_aspect_ratio.

LAION-2B scale: one node downloads ~100M images a day; laion2B-en is ~2.3B URLs. At that size run
img2dataset's distributed mode: `distributor="pyspark"` with a Spark standalone (or YARN/k8s) cluster,
the same img2dataset environment on every worker (`python -m data download-env --extra pyspark
--extra s3fs` on each node, or a shared image), the
input parquet files on shared/object storage, and `output_folder` on object storage (`s3://bucket/
laion2b-en-256`; fsspec handles s3/gcs/hdfs given s3fs/gcsfs). `subjob_size` shards are sent per
Spark job; workers need a fast local DNS resolver (img2dataset's README: knot-resolver/bind9) or
DNS becomes the bottleneck; use processes_count = cores and thread_count 64-256 per process. Set
`spark_master="spark://head:7077"` (and e.g. `spark_config=(("spark.executor.memory", "16G"),)`):
the runner creates that SparkSession before img2dataset starts, which then uses it instead of
making a local one (`local[processes_count]`, what you get without spark_master).
Incremental mode works the same on object storage, so a killed job is resumed by relaunching it.
`summarize` needs the shards' parquet/stats files on a local or mounted path.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .stages import Stage

IMG2DATASET_VERSION = "1.47.0"
# Pinned so that an env created today behaves as the one the tests ran against.
ENV_REQUIREMENTS = (f"img2dataset=={IMG2DATASET_VERSION}",)
ENV_STAMP = ".sd-repro-img2dataset"
# Environment variable naming a shared, reusable img2dataset env (tests and the CLI default).
ENV_VAR = "SD_REPRO_IMG2DATASET_ENV"

RESIZE_MODES = ("center_crop", "keep_ratio", "keep_ratio_largest", "border", "no")
# img2dataset refuses these in save_additional_columns: it writes them itself.
RESERVED_COLUMNS = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                              "status", "error_message", "exif", "md5", "sha256", "sha512"})
# Distinct error messages kept in a report (at LAION scale some messages name hosts: millions of them).
MAX_ERRORS = 1000
# An empty tar is two zero blocks padded to tar's 10 KiB record.
EMPTY_TAR_BYTES = 10240


def default_env_path() -> Path:
    """$SD_REPRO_IMG2DATASET_ENV, else a per-user cache (created once, reused by every checkout)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sd-repro" / f"img2dataset-{IMG2DATASET_VERSION}-venv"


def _env_python(path: Path) -> Path:
    return path / "bin" / "python"


def _run_env_cmd(args: Sequence[str], what: str) -> None:
    proc = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")


def _stamped(path: Path) -> set[str] | None:
    """Requirements recorded by a finished creation, or None if there was none (or it is broken)."""
    stamp = path / ENV_STAMP
    if not (_env_python(path).is_file() and stamp.is_file()):
        return None
    probe = subprocess.run([str(_env_python(path)), "-c", "import img2dataset"], env=_subprocess_env(None),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return set(stamp.read_text().split()) if probe.returncode == 0 else None


def create_env(path: str | os.PathLike | None = None, python: str | None = None, force: bool = False,
               extras: Sequence[str] = ()) -> Path:
    """Create (or reuse) the img2dataset virtual environment at `path`.

    extras: more requirements, e.g. ("pyspark", "s3fs") for the distributed mode. An existing env is
    reused when it was created with at least these requirements (a stamp written only after a
    successful install and import, so an interrupted creation is redone); otherwise it is rebuilt
    with the union. A file lock makes concurrent callers (parallel test sessions) wait for one
    creation instead of racing pip. `python` is the interpreter the venv is based on (default: the
    base interpreter of the one running this)."""
    path = Path(path) if path is not None else default_env_path()
    path = path.expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    wanted = set(ENV_REQUIREMENTS) | set(extras)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have = None if force else _stamped(path)
        if have is not None and wanted <= have:
            return path
        requirements = sorted(wanted | (have or set()))
        if path.exists():
            shutil.rmtree(path)
        base = python or getattr(sys, "_base_executable", None) or sys.executable
        _run_env_cmd([base, "-m", "venv", str(path)], f"creating a venv at {path}")
        py = str(_env_python(path))
        _run_env_cmd([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
                     f"pip install {' '.join(requirements)} into {path}")
        # The `dataclasses` backport (a dependency pin of img2dataset) shadows the standard library's
        # module on Python >= 3.7 and breaks it on 3.11; the stdlib one is what everything needs.
        listed = subprocess.run([py, "-m", "pip", "show", "--quiet", "dataclasses"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL).returncode == 0
        if listed:
            _run_env_cmd([py, "-m", "pip", "uninstall", "--yes", "--quiet", "dataclasses"],
                         f"removing the dataclasses backport from {path}")
        _run_env_cmd([py, "-c", "import img2dataset, dataclasses, sysconfig; assert dataclasses.__file__.startswith("
                      "sysconfig.get_paths()['stdlib']), dataclasses.__file__"],
                     f"importing img2dataset in {path}")
        (path / ENV_STAMP).write_text("\n".join(requirements) + "\n")
        return path


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset settings for one subset. Names are img2dataset's own where they map 1:1."""

    image_size: int = 256
    resize_mode: str = "center_crop"
    # False: smaller images are upscaled too, so every sample has exactly image_size x image_size.
    resize_only_if_bigger: bool = False
    # Shorter side of the *downloaded* image below this -> dropped ("image too small"). Presets set it
    # to the subset's min original size: LAION's WIDTH/HEIGHT are sometimes wrong.
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf
    url_col: str = "URL"
    caption_col: str = "TEXT"
    # Metadata columns copied into each sample's json; None = every input column except the URL and
    # caption columns (and names img2dataset reserves for itself).
    save_additional_columns: tuple[str, ...] | None = None
    number_sample_per_shard: int = 10000
    processes_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    thread_count: int = 64
    timeout: int = 10
    retries: int = 0
    encode_format: str = "jpg"
    encode_quality: int = 95
    incremental_mode: str = "incremental"
    distributor: str = "multiprocessing"
    subjob_size: int = 1000
    compute_hash: str | None = "sha256"
    extract_exif: bool = True
    user_agent_token: str | None = None
    # None: img2dataset's default (honour X-Robots-Tag noai/noimageai/noindex/noimageindex).
    disallowed_header_directives: tuple[str, ...] | None = None
    enable_wandb: bool = False
    # distributor="pyspark" only: the cluster to run on (None: a local Spark session) and its settings.
    spark_master: str | None = None
    spark_config: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        for name in ("image_size", "number_sample_per_shard", "processes_count", "thread_count", "timeout",
                     "subjob_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.min_image_size < 0 or self.retries < 0:
            raise ValueError("min_image_size and retries must be >= 0")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio={self.max_aspect_ratio}: must be >= 1 (long side / short side)")
        if self.incremental_mode not in ("incremental", "overwrite", "extend"):
            raise ValueError(f"incremental_mode={self.incremental_mode!r}: choose incremental (resume), "
                             "overwrite or extend")
        if self.distributor not in ("multiprocessing", "pyspark", "ray"):
            raise ValueError(f"distributor={self.distributor!r}: choose multiprocessing, pyspark or ray")
        if self.encode_format not in ("jpg", "png", "webp"):
            raise ValueError(f"encode_format={self.encode_format!r}: choose jpg, png or webp")
        if (self.spark_master or self.spark_config) and self.distributor != "pyspark":
            raise ValueError("spark_master/spark_config need distributor='pyspark'")
        if self.url_col == self.caption_col:
            raise ValueError(f"url_col and caption_col are both {self.url_col!r}")
        if self.save_additional_columns is not None:
            cols = tuple(self.save_additional_columns)
            clash = sorted((set(cols) & RESERVED_COLUMNS) | (set(cols) & {self.url_col, self.caption_col}))
            if clash:
                raise ValueError(f"save_additional_columns has {clash}: the URL/caption columns are saved anyway "
                                 f"(as url/caption) and img2dataset reserves {sorted(RESERVED_COLUMNS)}; remove them")
            object.__setattr__(self, "save_additional_columns", cols)

    @classmethod
    def for_stage(cls, stage: Stage, **overrides) -> "DownloadConfig":
        """The stage's resolution, its min original size re-checked on the decoded image, and the
        filter's URL/caption column names."""
        rules = stage.filter
        sides = [s for s in (rules.min_width, rules.min_height) if s is not None]
        base = cls(image_size=stage.image_size, min_image_size=min(sides) if sides else 0,
                   url_col=rules.columns.url, caption_col=rules.columns.caption)
        return replace(base, **overrides)

    def additional_columns(self, input_columns: Sequence[str]) -> list[str]:
        if self.save_additional_columns is None:
            return [c for c in input_columns if c not in (self.url_col, self.caption_col) and c not in RESERVED_COLUMNS]
        missing = [c for c in self.save_additional_columns if c not in input_columns]
        if missing:
            raise ValueError(f"save_additional_columns {missing} are not in the input (it has {list(input_columns)})")
        return list(self.save_additional_columns)

    def img2dataset_kwargs(self, url_list: str, output_folder: str, input_columns: Sequence[str]) -> dict:
        for needed in (self.url_col, self.caption_col):
            if needed not in input_columns:
                raise ValueError(f"input has no column {needed!r} (it has {list(input_columns)}); "
                                 "set url_col/caption_col")
        kwargs = dict(
            url_list=url_list, output_folder=output_folder, input_format="parquet", output_format="webdataset",
            image_size=self.image_size, resize_mode=self.resize_mode, resize_only_if_bigger=self.resize_only_if_bigger,
            min_image_size=self.min_image_size, url_col=self.url_col, caption_col=self.caption_col,
            save_additional_columns=self.additional_columns(input_columns) or None,
            number_sample_per_shard=self.number_sample_per_shard, processes_count=self.processes_count,
            thread_count=self.thread_count, timeout=self.timeout, retries=self.retries,
            encode_format=self.encode_format, encode_quality=self.encode_quality,
            incremental_mode=self.incremental_mode, distributor=self.distributor, subjob_size=self.subjob_size,
            compute_hash=self.compute_hash, extract_exif=self.extract_exif, user_agent_token=self.user_agent_token,
            enable_wandb=self.enable_wandb,
        )
        if math.isfinite(self.max_aspect_ratio):  # JSON has no inf; leave img2dataset's default
            kwargs["max_aspect_ratio"] = self.max_aspect_ratio
        if self.disallowed_header_directives is not None:
            kwargs["disallowed_header_directives"] = list(self.disallowed_header_directives)
        if self.spark_master is not None or self.spark_config:
            kwargs["_spark"] = {"master": self.spark_master, "config": [list(kv) for kv in self.spark_config]}
        return kwargs


@dataclass
class DownloadReport:
    output_dir: str
    shards: int = 0  # shards with a stats file (finished)
    urls: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    # error message -> count, most frequent first; the rarest beyond MAX_ERRORS are summed in other_errors
    errors: dict[str, int] = field(default_factory=dict)
    other_errors: int = 0
    empty_shards: list[str] = field(default_factory=list)  # finished, but no image survived
    unfinished_shards: list[str] = field(default_factory=list)  # a tar/parquet without stats: re-run to redo
    samples_in_tars: int | None = 0  # None: not counted (summarize(count_tars=False))
    duration_s: float = 0.0  # sum over shards (they run in parallel)
    wall_s: float | None = None

    @property
    def success_rate(self) -> float:
        return self.successes / self.urls if self.urls else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"success_rate": self.success_rate}

    def summary(self) -> str:
        lines = [f"{self.output_dir}: {self.shards} shards, {self.urls} URLs, {self.successes} images "
                 f"({100 * self.success_rate:.1f}%), {self.failed_to_download} failed to download, "
                 f"{self.failed_to_resize} failed to decode/resize"]
        lines += [f"  {count:>8}  {message}" for message, count in list(self.errors.items())[:10]]
        if len(self.errors) > 10 or self.other_errors:
            lines.append(f"  ... {len(self.errors) - 10} more distinct errors in the report"
                         + (f", and {self.other_errors} rarer failures" if self.other_errors else ""))
        if self.empty_shards:
            lines.append(f"  empty shards (every URL failed): {len(self.empty_shards)}")
        if self.unfinished_shards:
            lines.append(f"  unfinished shards (re-run to redo them): {', '.join(self.unfinished_shards)}")
        return "\n".join(lines)


def _tar_members(path: Path) -> int:
    with tarfile.open(path) as tar:
        return len({member.name.rsplit(".", 1)[0] for member in tar.getmembers() if member.isfile()})


def summarize(output_dir: str | os.PathLike, count_tars: bool = True) -> DownloadReport:
    """Totals of an img2dataset output folder, from its `*_stats.json` and per-shard parquet files.
    count_tars: also count the samples actually in the tars (reads every tar's headers)."""
    import pyarrow.parquet as pq

    out = Path(output_dir)
    report = DownloadReport(str(out))
    errors: Counter[str] = Counter()
    stats_ids = set()
    for stats_path in sorted(out.glob("*_stats.json")):
        shard = stats_path.name.removesuffix("_stats.json")
        stats_ids.add(shard)
        stats = json.loads(stats_path.read_text())
        report.shards += 1
        report.duration_s += stats.get("duration", 0.0)
        parquet = out / f"{shard}.parquet"
        if parquet.is_file():
            # The per-URL table is the exact record; stats' status_dict is capped at 100k distinct messages.
            table = pq.read_table(parquet, columns=["status", "error_message"])
            status = table.column("status").to_pylist()
            counts = Counter(status)
            errors.update(m if m is not None else "(no message)"
                          for s, m in zip(status, table.column("error_message").to_pylist()) if s != "success")
            urls, successes = table.num_rows, counts.get("success", 0)
            failed_download, failed_resize = counts.get("failed_to_download", 0), counts.get("failed_to_resize", 0)
        else:
            urls, successes = stats["count"], stats["successes"]
            failed_download, failed_resize = stats["failed_to_download"], stats["failed_to_resize"]
            errors.update({k: v for k, v in stats["status_dict"].items() if k != "success"})
        report.urls += urls
        report.successes += successes
        report.failed_to_download += failed_download
        report.failed_to_resize += failed_resize
        if successes == 0:
            report.empty_shards.append(shard)
        tar = out / f"{shard}.tar"
        if count_tars and tar.is_file():
            report.samples_in_tars += _tar_members(tar)
    if not count_tars:
        report.samples_in_tars = None
    leftovers = {p.name.split(".")[0] for p in list(out.glob("*.tar")) + list(out.glob("*.parquet"))}
    report.unfinished_shards = sorted(leftovers - stats_ids)
    kept = errors.most_common(MAX_ERRORS)
    report.errors = dict(kept)
    report.other_errors = sum(errors.values()) - sum(count for _, count in kept)
    return report


def _subprocess_env(tmpdir: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env["WANDB_SILENT"] = "true"
    # The training venv's packages must not leak into the img2dataset interpreter.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    return env


# Runs inside the img2dataset env. `_spark` is ours: a SparkSession made here is the "active session"
# img2dataset's pyspark distributor picks up.
_RUNNER = """\
import json, sys
args = json.load(open(sys.argv[1]))
spark = args.pop("_spark", None)
if spark is not None:
    from pyspark.sql import SparkSession
    builder = SparkSession.builder.appName("sd-repro-img2dataset")
    if spark["master"]:
        builder = builder.master(spark["master"])
    for key, value in spark["config"]:
        builder = builder.config(key, value)
    builder.getOrCreate()
from img2dataset import download
download(**args)
"""


def _input_columns(url_list: Path) -> list[str]:
    """Columns every input file has (img2dataset reads the same columns from each)."""
    import pyarrow.parquet as pq

    files = sorted(url_list.glob("*.parquet")) if url_list.is_dir() else [url_list]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"{url_list}: no parquet file(s) there (run `python -m data filter` first)")
    names = pq.read_schema(files[0]).names
    for f in files[1:]:
        theirs = set(pq.read_schema(f).names)
        names = [n for n in names if n in theirs]
    return names


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def _run_img2dataset(python: Path, kwargs: dict, log_path: Path | None, timeout_s: float | None) -> None:
    tmpdir = tempfile.mkdtemp(prefix="sd-repro-img2dataset-")
    try:
        args_file = Path(tmpdir) / "args.json"
        args_file.write_text(json.dumps(kwargs))
        with open(log_path, "ab") if log_path is not None else contextlib.nullcontext() as log:
            # Own session: on a timeout or Ctrl-C the whole group goes (img2dataset's pool workers and
            # its logger process would otherwise outlive it).
            proc = subprocess.Popen([str(python), "-c", _RUNNER, str(args_file)], env=_subprocess_env(tmpdir),
                                    stdout=log, stderr=subprocess.STDOUT if log is not None else None, cwd=tmpdir,
                                    start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise TimeoutError(f"img2dataset did not finish within {timeout_s}s and was stopped; finished shards "
                                   "are kept, re-run to resume") from None
            except BaseException:  # Ctrl-C and the like
                _kill_group(proc)
                raise
        if returncode:
            tail = f"; the end of {log_path}:\n{log_path.read_text(errors='replace')[-4000:]}" if log_path else \
                " (its output is above)"
            raise RuntimeError(f"img2dataset exited with {returncode}{tail}")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def download(url_list: str | os.PathLike, output_dir: str | os.PathLike, config: DownloadConfig,
             env_path: str | os.PathLike | None = None, report_path: str | os.PathLike | None = None,
             timeout_s: float | None = None, quiet: bool = False) -> DownloadReport | None:
    """Run img2dataset on `url_list` (a local parquet file or folder of them) into `output_dir`, then
    summarize. The report goes to `report_path` (default `<output_dir>.download.json`, beside the
    folder: img2dataset would parse any *.json inside it as a shard). quiet: img2dataset's output goes
    to `<output_dir>.download.log` instead of the terminal. An `s3://...`-style output_dir is passed
    through (the env needs its fsspec backend, see create_env(extras=...)) and not summarized: None
    is returned; run `summarize` on a mounted copy. Raises if img2dataset fails or times out."""
    url_list = Path(url_list).absolute()
    remote = _is_remote(output_dir)
    out = str(output_dir) if remote else str(Path(output_dir).absolute())
    env = create_env(env_path)
    kwargs = config.img2dataset_kwargs(str(url_list), out, _input_columns(url_list))
    local = None if remote else Path(out)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
    log_path = local.with_name(local.name + ".download.log") if quiet and local is not None else None
    start = time.monotonic()
    _run_img2dataset(_env_python(env), kwargs, log_path, timeout_s)
    if local is None:
        return None
    report = summarize(local)
    report.wall_s = time.monotonic() - start
    report_path = Path(report_path) if report_path is not None else local.with_name(local.name + ".download.json")
    report_path.write_text(json.dumps(report.to_dict() | {"config": asdict(config) | {
        "max_aspect_ratio": None if math.isinf(config.max_aspect_ratio) else config.max_aspect_ratio}},
        indent=2) + "\n")
    return report
