"""The launcher on a real Slurm (22.05, two emulated nodes on this host, see .ci/slurm/) with the real
trainer: a 2-node mini job interrupted mid-run comes back and ends exactly like an uninterrupted run,
and a 2-stage chain starts its second stage from the first stage's weights, on latent shards a job
submitted before it made.

Each test runs one or two ~40 s jobs, one at a time (the cluster has two nodes, the machine 2 cores).
"""
from __future__ import annotations

import json
from pathlib import Path

from data.precompute import load_models

from slurm_cluster import (JOB_TIMEOUT_S, SlurmCluster, assert_latents_of, assert_same_weights, job_env, launch,
                           mini_overrides, read_status, reference_run, shards, slurm_cluster, unet_weights, wait_for)

__all__ = ["reference_run", "shards", "slurm_cluster"]  # fixtures, imported for pytest


def _log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"{job_id}.out"
    return path.read_text() if path.is_file() else f"(no log at {path})"


def _submit(cluster: SlurmCluster, run_dir: Path, shards: str, tmp: Path) -> str:
    launch(["slurm", "stage=mini_test", *mini_overrides(shards, run_dir)], job_env(tmp, SLURM_CONF=cluster.conf))
    return json.loads((run_dir / "slurm" / "launch.json").read_text())["job_id"]


def _status_is(run_dir: Path, state: str):
    status = read_status(run_dir)
    return status if status and status["state"] == state else None


def _preempted(run_dir: Path, job_id: str) -> dict | None:
    """The status once the interrupted run has checkpointed; fails at once if that run ended without."""
    status = _status_is(run_dir, "preempted")
    log = _log(run_dir, job_id)
    if status or "[launch] srun exited" not in log:
        return status
    hint = ""
    if "DataLoader worker" in log and "killed by signal: Terminated" in log:
        # Slurm signals every process of a job; torch's loader workers exit on a SIGTERM that their
        # parent did not send, and the rank dies with them before it can checkpoint.
        hint = "\nthe data loader's worker processes must ignore SIGTERM (their parent stops them)"
    raise AssertionError(f"the interrupted run ended without a pre-emption checkpoint: {read_status(run_dir)}"
                         f"{hint}\n{log[-5000:]}")


def _interrupt_and_finish(cluster: SlurmCluster, run_dir: Path, job_id: str, interrupt) -> dict:
    """Wait for training to be under way, interrupt it, check the pre-emption checkpoint, let the
    requeued job run, wait for the end. Returns the status at the interruption."""
    details = lambda: _log(run_dir, job_id)[-5000:]  # noqa: E731
    wait_for(lambda: (read_status(run_dir) or {}).get("step", 0) >= 1, JOB_TIMEOUT_S, "training under way", details)
    interrupt()
    stopped = wait_for(lambda: _preempted(run_dir, job_id), 120,
                       "state 'preempted' (the workers checkpoint on the signal, then exit 75)", details)
    assert 0 < stopped["step"] < stopped["total_steps"], stopped
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{stopped['step']}"
    cluster.release_requeued(job_id)
    wait_for(lambda: cluster.job(job_id).get("JobState") == "COMPLETED", JOB_TIMEOUT_S,
             f"job {job_id} to complete", lambda: f"{cluster.job(job_id)}\n{details()}")
    assert _status_is(run_dir, "finished"), read_status(run_dir)
    return stopped


def test_requeue_mid_run_resumes_from_its_checkpoint(slurm_cluster, shards, reference_run, tmp_path):
    """`scontrol requeue` (Slurm sends SIGTERM to every process of the job) mid-run."""
    run_dir = tmp_path / "run"
    job_id = _submit(slurm_cluster, run_dir, shards, tmp_path)
    try:
        stopped = _interrupt_and_finish(slurm_cluster, run_dir, job_id,
                                        lambda: slurm_cluster.run("scontrol", "requeue", job_id))
    finally:
        slurm_cluster.cancel(job_id)
    log = _log(run_dir, job_id)
    assert f"resumed from {run_dir}/checkpoints/step-{stopped['step']} at step {stopped['step']}" in log, log[-5000:]
    assert slurm_cluster.job(job_id)["Restarts"] == "1"
    assert_same_weights(unet_weights(run_dir), unet_weights(reference_run))
    assert read_status(run_dir)["loss"] == read_status(reference_run)["loss"]


def test_preemption_warning_checkpoints_and_requeues_itself(slurm_cluster, shards, reference_run, tmp_path):
    """What `--signal=B:USR1@grace` does before the time limit: USR1 to the batch shell, which has the
    workers checkpoint and requeues the job itself."""
    run_dir = tmp_path / "run"
    job_id = _submit(slurm_cluster, run_dir, shards, tmp_path)
    try:
        stopped = _interrupt_and_finish(slurm_cluster, run_dir, job_id, lambda: slurm_cluster.run(
            "scancel", "--batch", "--signal=USR1", job_id))
    finally:
        slurm_cluster.cancel(job_id)
    log = _log(run_dir, job_id)
    assert f"[launch] requeueing job {job_id}" in log, log[-5000:]
    assert f"resumed from {run_dir}/checkpoints/step-{stopped['step']} at step {stopped['step']}" in log
    assert_same_weights(unet_weights(run_dir), unet_weights(reference_run))


def test_two_stage_chain_starts_the_second_stage_from_the_first(slurm_cluster, shards, tmp_path):
    """SD v1's chain shape: the first stage reads images, the second the latents of images, which a job
    submitted first (`stage.data.precompute_from`) makes with the VAE the first stage trains with. The
    second stage runs with lr 0: its exported UNet is then exactly the weights it started from, which
    must be the first stage's (trained) weights."""
    runs, latents = tmp_path / "runs", tmp_path / "latents"
    images = shards.split("=", 1)[1].strip("'")
    args = ["chain", "--stages", "first=mini_test,second=mini_test", f"run.root={runs}", "run.name=chain",
            *mini_overrides(shards), "second:optim.lr=0", f"second:stage.data.shards='{latents}/{{00000..00003}}.tar'",
            "second:stage.data.latents=true", f"second:stage.data.precompute_from='{images}'"]
    env = job_env(tmp_path, SLURM_CONF=slurm_cluster.conf)
    launch(args, env)
    first, second = runs / "chain" / "first", runs / "chain" / "second"
    ids = [json.loads((d / "slurm" / "launch.json").read_text()) for d in (first, second, latents / ".precompute")]
    logs = lambda: "".join(_log(d, r["job_id"])[-3000:] for d, r in zip((first, second, latents / ".precompute"), ids))  # noqa: E731
    try:
        assert ids[1]["dependency"] == f"{ids[0]['job_id']}:{ids[2]['job_id']}" and ids[2]["dependency"] is None
        dependency = slurm_cluster.job(ids[1]["job_id"])["Dependency"]
        assert f"afterok:{ids[0]['job_id']}" in dependency and f"afterok:{ids[2]['job_id']}" in dependency
        wait_for(lambda: _status_is(second, "finished"), 3 * JOB_TIMEOUT_S, "all three jobs to finish", logs)
    finally:
        for record in ids:
            slurm_cluster.cancel(record["job_id"])
    jobs = [slurm_cluster.job(r["job_id"]) for r in ids]
    assert jobs[1]["StartTime"] >= max(jobs[0]["EndTime"], jobs[2]["EndTime"]), jobs  # ISO times compare as strings
    assert_same_weights(unet_weights(second), unet_weights(first))
    assert_latents_of(load_models(first / "export" / "model.ckpt", arch="tiny")[0], images, latents,
                      ["00000.tar", "00003.tar"], tmp_path / "here")

    # Submitting the chain again submits nothing: both stages are finished.
    again = launch(args, env)
    assert again.stdout.count("finished, skipped") == 2, again.stdout
    assert json.loads((second / "slurm" / "launch.json").read_text())["job_id"] == ids[1]["job_id"]
    rows = json.loads(launch(["status", "--json", "--stages", "first=mini_test,second=mini_test",
                              f"run.root={runs}", "run.name=chain"], env).stdout)
    assert [(r["stage"], r["state"], r["step"], r["job"]) for r in rows] == [
        ("first", "finished", 6, ids[0]["job_id"]), ("second", "finished", 6, ids[1]["job_id"])]
