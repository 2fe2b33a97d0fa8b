"""One training run per run folder: rank 0 holds `<run.dir>/run.lock` (flock) while the stage trains.

Two runs given the same run.dir (the same stage launched twice, a restart while the old job still lives) would
write the same `checkpoints/step-N.tmp`, one deleting the other's files mid-save, and advance `latest` in turn
from two different trainings. The lock is the kernel's (on NFS, its lock manager's): a process killed outright
(kill -9, the OOM killer) loses it at once, so torchrun's restart and a requeued job take it again; a process
still alive keeps it, and the second run stops before it writes anything. Reading a checkpoint
(`checkpoint.export`, to evaluate a stage while it trains) does not take it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = "run.lock"
_held: list[int] = []  # the descriptors this process holds; closed in forked children (see _forget_in_child)


class RunDirInUse(RuntimeError):
    pass


def _forget_in_child() -> None:
    """A forked child (a data-loader worker) shares the parent's lock: it would keep it after the trainer was
    killed, until it noticed and exited, and torchrun's restart would find the folder in use. Closing the
    child's copy leaves the lock with the trainer alone."""
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def hold_run_dir(run_dir: Path) -> int | None:
    """Takes the run folder's lock for the life of this process (returns the descriptor that holds it), or
    raises RunDirInUse naming the process that holds it. None where the file system has no locks."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise RunDirInUse(
                f"{run_dir} is in use by another training run ({holder}): two runs in one folder overwrite each "
                "other's checkpoints. Wait for it to end or stop it, or give this run another run.dir "
                "(or run.name)") from err
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            print(f"warning: {path}: this file system does not lock files ({err.strerror}); nothing stops a "
                  "second run from using this run folder at the same time", flush=True)
            return None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), 0)
    _held.append(fd)
    return fd


def release_run_dir(fd: int) -> None:
    """Lets the lock go before this process ends (the trainer never does: its exit releases it)."""
    _held.remove(fd)
    os.close(fd)
