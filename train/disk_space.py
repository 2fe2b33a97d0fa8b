"""Room on the disk for what a run writes (its checkpoints, the stage's export).

A full disk used to surface as a C++ stream error from half-way through a file ("basic_ios::clear: iostream
error", "unexpected pos 71512384 vs 71512272"), saying nothing of the disk. Here a write is sized against the
free space first, and a write that fails anyway with the disk full is named for what it is.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

# Left free beyond a write's size: the file system's own blocks, and the small files written beside it.
MARGIN_BYTES = 64 * 2**20
# Below this much free space after a failed write, the disk (not the write) is taken as the cause.
FULL_BELOW_BYTES = 256 * 2**20


class DiskFull(OSError):
    """Not enough room for a write, found before it (nothing written) or by its failure."""


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


def bytes_under(path: Path, leave_out_suffix: str | None = None) -> int:
    """The size of the files under `path` (a checkpoint folder), less those in folders whose name ends with
    `leave_out_suffix`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not (
        leave_out_suffix and any(part.endswith(leave_out_suffix) for part in f.relative_to(path).parent.parts)))


def check_room(folder: Path, need: int, what: str, advice: str) -> None:
    """Raises DiskFull when `folder`'s file system has less free than `need` bytes and a margin."""
    free = shutil.disk_usage(folder).free
    if free < need + max(MARGIN_BYTES, need // 50):
        raise DiskFull(errno.ENOSPC, f"no room for {what}: it needs about {_size(need)} and the disk of {folder} has "
                                     f"{_size(free)} free; nothing of it was written. {advice}")


def named_if_disk_full(err: BaseException, folder: Path, what: str, advice: str) -> BaseException:
    """The error to raise for `err`, a write into `folder` that failed: DiskFull (caused by `err`) when the disk
    or a quota is full, measured while the partial files are still there; `err` itself otherwise. Only I/O
    failures are looked at (OSError; RuntimeError, as torch.save's stream errors; DCP's exception, which carries
    each failed rank's own): a bug must not be called a full disk because the disk happens to be nearly full."""
    if not isinstance(err, (OSError, RuntimeError)) and not hasattr(err, "failures"):
        return err
    full = _explain_write_failure(err, folder, what, advice)
    if full is None:
        return err
    full.__cause__ = err
    return full


def _explain_write_failure(err: BaseException, folder: Path, what: str, advice: str) -> DiskFull | None:
    code = getattr(err, "errno", None)
    if code == errno.EDQUOT:
        return DiskFull(code, f"writing {what} into {folder} went over a disk quota ({err}). {advice}")
    free = shutil.disk_usage(folder).free
    if code == errno.ENOSPC or free < FULL_BELOW_BYTES:
        failures = getattr(err, "failures", None)  # DCP's CheckpointException: {rank: (its error, traceback)}
        where = ""
        if failures:
            rank, (err, _) = next(iter(failures.items()))
            where = f"rank {rank}: "
        first_line = (str(err).splitlines() or [""])[0][:200]
        return DiskFull(errno.ENOSPC, f"writing {what} into {folder} failed with its disk full ({_size(free)} free; "
                                      f"{where}{type(err).__name__}: {first_line}). {advice}")
    return None
