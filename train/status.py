"""`<run.dir>/status.json`: what the launcher and `python -m launch status` read about a stage."""
from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

STATES = ("running", "preempted", "finished", "failed")


def write_status(run_dir: Path, state: str, step: int, total_steps: int, loss: float | None, **extra) -> None:
    assert state in STATES, state
    record = {"state": state, "step": step, "total_steps": total_steps, "loss": loss,
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              # Who wrote it: a process killed outright (SIGKILL, the OOM killer) cannot say it ended.
              "host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(), **extra}
    path = run_dir / "status.json"
    tmp = path.with_name("status.json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_status(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _pid_namespace() -> str | None:
    """Linux's id of this process's pid namespace: a container with the host's name numbers its processes
    apart, and its pids mean nothing outside it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def writer_gone(status: dict) -> bool:
    """A "running" record whose writer was a process on this host (and in this pid namespace) that no
    longer exists: killed without a word (kill -9, the OOM killer) or its node rebooted. Records from
    other hosts or containers cannot be checked here (Slurm's job state says what became of those)."""
    if (status.get("state") != "running" or status.get("host") != socket.gethostname() or not status.get("pid")
            or status.get("pid_namespace") is None or status.get("pid_namespace") != _pid_namespace()):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
