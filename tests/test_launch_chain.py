"""The stage chain without Slurm: stage lists, per-stage overrides, each stage initialised from the
previous one's export, afterok ordering, skipping finished stages and never submitting a queued one
twice (Slurm is replaced by callables here; test_launch_slurm.py runs a chain on a real one)."""
from __future__ import annotations

import os

import pytest

from launch.chain import (DEFAULT_STAGES, Decision, StageSpec, compose_chain, execute, parse_stages, plan,
                          split_overrides)
from launch.config import ConfigError
from slurm_cluster import job_env, launch, recording_submitter

SHARDS = "stage.data.shards='/data/{00000..00003}.tar'"
MINI = "a=mini_test,b=mini_test,c=mini_test"


def test_stage_lists():
    assert [s.label for s in parse_stages(DEFAULT_STAGES)] == ["v1-1_256", "v1-1_512", "v1-2", "v1-3"]
    assert parse_stages("first=mini_test, v1-2") == [StageSpec("first", "mini_test"), StageSpec("v1-2", "v1-2")]
    for bad in ("", "a,a", "x=mini_test,x=v1-2"):
        with pytest.raises(ConfigError, match="distinct stage names"):
            parse_stages(bad)


def test_overrides_for_every_stage_and_for_one():
    common, scoped = split_overrides(["run.name=x", "v1-2:stage.data.shards='/a/{0..9}.tar'", "v1-2:optim.lr=0"],
                                     ["v1-1_256", "v1-2"])
    assert common == ["run.name=x"]
    assert scoped == {"v1-1_256": [], "v1-2": ["stage.data.shards='/a/{0..9}.tar'", "optim.lr=0"]}
    with pytest.raises(ConfigError, match="not in the chain"):
        split_overrides(["v9:optim.lr=0"], ["v1-2"])
    with pytest.raises(ConfigError, match="--stages"):
        split_overrides(["stage=v1-2"], ["v1-2"])


def test_each_stage_starts_from_the_previous_export(tmp_path):
    jobs = compose_chain(parse_stages(MINI), [SHARDS, f"run.root={tmp_path}", "c:optim.lr=0"])
    assert [j.stage for j in jobs] == ["a", "b", "c"]
    assert [j.run_dir for j in jobs] == [tmp_path / "sd-repro" / s for s in "abc"]
    inits = [[o for o in j.overrides if o.startswith("stage.init.from_checkpoint=")] for j in jobs]
    assert inits == [[], [f"stage.init.from_checkpoint={tmp_path}/sd-repro/a/export"],
                     [f"stage.init.from_checkpoint={tmp_path}/sd-repro/b/export"]]
    assert "optim.lr=0" in jobs[2].overrides and "optim.lr=0" not in jobs[1].overrides


def test_the_reference_chain_composes_on_the_reference_cluster(tmp_path):
    jobs = compose_chain(parse_stages(DEFAULT_STAGES), [
        "cluster=reference_32x8", f"run.root={tmp_path}", "model.pretrained_first_stage=/ckpt/sd-v1-1.ckpt",
        "v1-1_256:stage.data.shards='/laion2b/{00000..99999}.tar'",
        "v1-1_512:stage.data.shards='/laion-hr/{00000..09999}.tar'",
        "v1-2:stage.data.shards='/aesthetics/{00000..05999}.tar'",
        "v1-3:stage.data.shards='/aesthetics/{00000..05999}.tar'"])
    assert [j.world_size for j in jobs] == [256] * 4
    assert jobs[3].overrides[-2:] == ("stage.data.shards='/aesthetics/{00000..05999}.tar'", f"run.dir={jobs[3].run_dir}")
    # One stage left without its shards: the message names it, and the scoped form that sets them.
    with pytest.raises(ConfigError, match=r"stage v1-2: these settings have no value.*stage\.data\.shards "
                                          r"\(for this stage only: v1-2:key=value\)"):
        compose_chain(parse_stages("v1-1_512,v1-2"), [
            "cluster=reference_32x8", f"run.root={tmp_path}", "v1-1_512:stage.data.shards='/laion-hr/{0..9}.tar'"])


def test_one_run_folder_for_every_stage_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="share a run folder"):
        compose_chain(parse_stages(MINI), [SHARDS, f"run.dir={tmp_path}/same"])


def _jobs(tmp_path):
    return compose_chain(parse_stages(MINI), [SHARDS, f"run.root={tmp_path}"])


def test_a_fresh_chain_is_submitted_in_order_with_afterok(tmp_path):
    decisions = plan(_jobs(tmp_path), status_of=lambda d: None, active_of=lambda d: None)
    submit, submitted = recording_submitter()
    execute(decisions, submit)
    assert submitted == [("a", None), ("b", "101"), ("c", "102")]
    assert [(d.action, d.job_id, d.after) for d in decisions] == [
        ("submit", "101", None), ("submit", "102", "101"), ("submit", "103", "102")]


def test_resubmitting_skips_finished_stages_and_waits_for_queued_ones(tmp_path):
    jobs = _jobs(tmp_path)
    finished = {jobs[0].run_dir}
    queued = {jobs[1].run_dir: "57"}
    decisions = plan(jobs, status_of=lambda d: {"state": "finished"} if d in finished else {"state": "preempted"},
                     active_of=queued.get)
    submit, submitted = recording_submitter()
    execute(decisions, submit)
    assert [d.action for d in decisions] == ["finished", "queued", "submit"]
    assert submitted == [("c", "57")]  # b is already in Slurm: not submitted twice, c waits for it


def test_after_a_finished_stage_the_next_waits_for_nothing(tmp_path):
    jobs = _jobs(tmp_path)
    decisions = plan(jobs, status_of=lambda d: {"state": "finished"} if d == jobs[0].run_dir else None,
                     active_of=lambda d: None)
    submit, submitted = recording_submitter()
    execute(decisions, submit)
    assert submitted == [("b", None), ("c", "101")]


def test_a_finished_stage_after_an_unfinished_one_is_refused(tmp_path):
    jobs = _jobs(tmp_path)
    with pytest.raises(ConfigError, match="earlier"):
        plan(jobs, status_of=lambda d: {"state": "finished"} if d == jobs[1].run_dir else None,
             active_of=lambda d: None)


def test_everything_finished_submits_nothing(tmp_path):
    decisions = plan(_jobs(tmp_path), status_of=lambda d: {"state": "finished"}, active_of=lambda d: None)
    submit, submitted = recording_submitter()
    execute(decisions, submit)
    assert submitted == [] and all(isinstance(d, Decision) and d.action == "finished" for d in decisions)


def test_chain_dry_run_prints_every_script_with_its_dependency(tmp_path):
    out = launch(["chain", "--dry-run", "--stages", MINI, SHARDS, f"run.root={tmp_path}"], job_env(tmp_path)).stdout
    assert out.count("#!/bin/bash") == 3
    assert "#SBATCH --dependency=afterok:<job of a>" in out and "#SBATCH --dependency=afterok:<job of b>" in out
    assert f"stage.init.from_checkpoint={tmp_path}/sd-repro/a/export" in out
    assert not (tmp_path / "sd-repro").exists()


def test_submission_is_recorded_and_recognised_while_slurm_holds_it(tmp_path, monkeypatch):
    """slurm.submit / active_job against stand-in sbatch and squeue (the real ones: test_launch_slurm.py)."""
    from launch import slurm
    from launch.sbatch import render

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\necho "$@" > "$(dirname "$0")/sbatch.args"\necho "77;ci"\n')
    (fake / "squeue").write_text('#!/bin/bash\ncat "$(dirname "$0")/state"\n')
    for name in ("sbatch", "squeue"):
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    job = _jobs(tmp_path)[1]
    assert slurm.submit(job, render(job, python="python", dependency="76"), "76") == "77"
    record = slurm.read_record(job.run_dir)
    assert (record["job_id"], record["dependency"], record["log"]) == ("77", "76", f"{job.run_dir}/slurm/77.out")
    assert (job.run_dir / "slurm" / "job-77.sbatch").read_text().count("--dependency=afterok:76") == 1
    assert (fake / "sbatch.args").read_text().split() == ["--parsable", f"{job.run_dir}/slurm/job.sbatch.tmp"]
    (fake / "state").write_text("PENDING Dependency\n")
    assert slurm.job_state("77") == "PENDING (Dependency)" and slurm.active_job(job.run_dir) == "77"
    (fake / "state").write_text("RUNNING None\n")
    assert slurm.job_state("77") == "RUNNING" and slurm.active_job(job.run_dir) == "77"
    (fake / "state").write_text("FAILED NonZeroExitCode\n")
    assert slurm.active_job(job.run_dir) is None  # ended: the chain submits it again (it resumes)
