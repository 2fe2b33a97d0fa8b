"""Talking to Slurm: submit a rendered script, ask about a job, and keep a record of what was sent.

The record, `<run.dir>/slurm/launch.json`, holds the stage's last job id: the chain and the status
command use it to recognise a stage that is still queued or running (and never submit it twice).
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from launch.config import StageJob
from launch.precompute import PrecomputeJob
from launch.sbatch import log_dir

RECORD = "launch.json"
# States after which a job id will never run again; anything else (PENDING, RUNNING, REQUEUED,
# COMPLETING, SUSPENDED, ...) means the stage is in Slurm's hands.
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
TIMEOUT_S = 60  # a Slurm client call; the controller answers in milliseconds when it is up


class SlurmError(RuntimeError):
    pass


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError as err:
        raise SlurmError(f"{argv[0]} not found: run this on a Slurm login node (or add Slurm's bin to PATH)") from err


def record_path(run_dir: Path) -> Path:
    return run_dir / "slurm" / RECORD


def read_record(run_dir: Path) -> dict | None:
    path = record_path(run_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def submit(job: StageJob | PrecomputeJob, script: str, dependency: str | None = None) -> str:
    """sbatch the script; returns the job id and records it in the job's run folder (a stage's, or a latent
    folder's .precompute)."""
    folder = job.run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    log_dir(job).mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script runs
    pending = folder / "job.sbatch.tmp"
    pending.write_text(script)
    proc = _run(["sbatch", "--parsable", str(pending)])
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused {job.stage} (exit {proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    kept = folder / f"job-{job_id}.sbatch"
    os.replace(pending, kept)
    record = {"job_id": job_id, "stage": job.stage, "dependency": dependency, "script": str(kept),
              "log": str(log_dir(job) / f"{job_id}.out"),
              "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = record_path(job.run_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, record_path(job.run_dir))
    return job_id


def job_state(job_id: str) -> str | None:
    """Slurm's state of the job with the reason it waits, if any ("RUNNING", "PENDING (Dependency)",
    "COMPLETED"), or None once Slurm has forgotten it."""
    proc = _run(["squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T %r"])
    if proc.returncode != 0 or not proc.stdout.strip():  # "Invalid job id specified": purged after MinJobAge
        return None
    state, _, reason = proc.stdout.strip().partition(" ")
    return f"{state} ({reason})" if reason and reason != "None" else state


def active_job(run_dir: Path) -> str | None:
    """The recorded job id of this stage if Slurm will still run it (queued, running, requeued)."""
    record = read_record(run_dir)
    if record is None:
        return None
    state = job_state(record["job_id"])
    return record["job_id"] if state is not None and state.split()[0] not in TERMINAL else None
