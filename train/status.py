"""`<run.dir>/status.json`: what the launcher and `python -m launch status` read about a stage."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

STATES = ("running", "preempted", "finished", "failed")


def write_status(run_dir: Path, state: str, step: int, total_steps: int, loss: float | None, **extra) -> None:
    assert state in STATES, state
    record = {"state": state, "step": step, "total_steps": total_steps, "loss": loss,
              "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}
    path = run_dir / "status.json"
    tmp = path.with_name("status.json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_status(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None
