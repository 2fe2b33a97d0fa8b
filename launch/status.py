"""`python -m launch status`: each stage's state, step and last loss (from its status.json, written by
the trainer; "lost" where it says running but its process on this host is gone), the step a start would
resume from, and, where the stage was submitted to Slurm, the job and what Slurm says of it; for a stage
with `stage.data.precompute_from`, also the latent shards made so far and the job making them."""
from __future__ import annotations

from typing import Callable, Sequence

from launch.config import StageJob
from launch.precompute import PrecomputeJob
from train.checkpoint import CheckpointUnreadable, latest_checkpoint
from train.status import read_status, writer_gone

COLUMNS = ("stage", "state", "step", "loss", "updated", "checkpoint", "job", "slurm")
# "running" in a status.json whose process is gone (see train.status.writer_gone): it will not resume by
# itself; starting it again resumes from the checkpoint column's step.
LOST = "lost"


def _precompute_row(job: PrecomputeJob, read_record: Callable, job_state: Callable | None) -> dict:
    """The latent shards' job as a row: its step is shards made of shards needed."""
    made = len(job.latents) - len(job.missing())
    job_id = (read_record(job.run_dir) or {}).get("job_id")
    state = "done" if made == len(job.latents) else "incomplete" if made else "not started"
    return {"stage": job.stage, "run_dir": str(job.out_dir), "state": state, "step": made,
            "total_steps": len(job.latents), "loss": None, "updated": None, "checkpoint": None, "job": job_id,
            "slurm": job_state(job_id) if (job_id and job_state) else None}


def _checkpoint_step(run_dir) -> int | None:
    """The step a start would resume from (the latest complete checkpoint), None without one."""
    try:
        latest = latest_checkpoint(run_dir / "checkpoints")
    except CheckpointUnreadable:
        return None
    return None if latest is None else int(latest.name.removeprefix("step-"))


def stage_rows(jobs: Sequence[StageJob], read_record: Callable, job_state: Callable | None) -> list[dict]:
    """One dict a stage, after the one of the job making its latent shards (if it has one, listed once);
    `job_state(job_id)` is None where Slurm is not reachable (local runs)."""
    rows, latent_folders = [], set()
    for job in jobs:
        if job.precompute is not None and job.precompute.out_dir not in latent_folders:
            latent_folders.add(job.precompute.out_dir)
            rows.append(_precompute_row(job.precompute, read_record, job_state))
        status = read_status(job.run_dir) or {}
        record = read_record(job.run_dir) or {}
        job_id = record.get("job_id")
        rows.append({
            "stage": job.stage, "run_dir": str(job.run_dir),
            # A stage with no status.json has not started (or is still waiting in the queue).
            "state": LOST if writer_gone(status) else status.get("state", "not started"),
            "step": status.get("step"), "total_steps": status.get("total_steps"), "loss": status.get("loss"),
            "updated": status.get("updated"), "checkpoint": _checkpoint_step(job.run_dir), "job": job_id,
            "slurm": job_state(job_id) if (job_id and job_state) else None,
        })
    return rows


def _cell(row: dict, column: str) -> str:
    if column == "step":
        return "-" if row["step"] is None else f"{row['step']}/{row['total_steps']}"
    if column == "loss":
        return "-" if row["loss"] is None else f"{row['loss']:.4f}"
    if column == "slurm" and row["job"] and row["slurm"] is None:
        return "gone"  # Slurm no longer knows the job (MinJobAge passed)
    value = row[column]
    return "-" if value is None else str(value)


def format_table(rows: Sequence[dict]) -> str:
    cells = [list(COLUMNS)] + [[_cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)
