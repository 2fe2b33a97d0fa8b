"""`python -m launch status`: each stage's state, step and last loss from the status.json files the
trainer writes, with the stage's Slurm job where there is one."""
from __future__ import annotations

import json

from launch.chain import compose_chain, parse_stages
from launch.status import format_table, stage_rows
from slurm_cluster import job_env, launch

STAGES = "a=mini_test,b=mini_test,c=mini_test"


def _write_status(run_dir, state, step, loss):
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps(
        {"state": state, "step": step, "total_steps": 6, "loss": loss, "updated": "2026-11-27T08:00:00+00:00"},
        indent=1))


def _jobs(tmp_path):
    return compose_chain(parse_stages(STAGES), [f"run.root={tmp_path}"], strict=False)


def test_rows_and_table(tmp_path):
    jobs = _jobs(tmp_path)
    _write_status(jobs[0].run_dir, "finished", 6, 0.7453)
    _write_status(jobs[1].run_dir, "preempted", 2, 1.133)
    records = {jobs[0].run_dir: {"job_id": "11"}, jobs[1].run_dir: {"job_id": "12"}, jobs[2].run_dir: {"job_id": "13"}}
    states = {"11": None, "12": "PENDING (BeginTime)", "13": "PENDING (Dependency)"}
    rows = stage_rows(jobs, records.get, states.get)
    assert [(r["stage"], r["state"], r["step"], r["loss"], r["job"], r["slurm"]) for r in rows] == [
        ("a", "finished", 6, 0.7453, "11", None), ("b", "preempted", 2, 1.133, "12", "PENDING (BeginTime)"),
        ("c", "not started", None, None, "13", "PENDING (Dependency)")]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["stage", "state", "step", "loss", "updated", "checkpoint", "job", "slurm"]
    assert lines[1].split() == ["a", "finished", "6/6", "0.7453", "2026-11-27T08:00:00+00:00", "-", "11", "gone"]
    assert lines[2].split()[:4] == ["b", "preempted", "2/6", "1.1330"]
    assert lines[3].split()[:4] == ["c", "not", "started", "-"]


def test_local_runs_have_no_slurm_column_values(tmp_path):
    jobs = _jobs(tmp_path)
    _write_status(jobs[0].run_dir, "running", 3, None)
    rows = stage_rows(jobs, lambda d: None, None)
    assert [(r["state"], r["job"], r["slurm"]) for r in rows] == [("running", None, None),
                                                                 ("not started", None, None),
                                                                 ("not started", None, None)]
    assert format_table(rows).splitlines()[1].split() == ["a", "running", "3/6", "-", "2026-11-27T08:00:00+00:00",
                                                          "-", "-", "-"]


def test_a_run_killed_outright_is_lost_not_running(tmp_path):
    """kill -9 (or the OOM killer) leaves status.json saying running, for ever: where its writer was a
    process on this host that is gone, the state is "lost", beside the step a start would resume from."""
    import subprocess
    import sys

    from train.status import write_status

    jobs = _jobs(tmp_path)
    jobs[0].run_dir.mkdir(parents=True)
    write_status(jobs[0].run_dir, "running", 8, 12, 0.78)
    (jobs[0].run_dir / "checkpoints" / "step-6").mkdir(parents=True)
    (jobs[0].run_dir / "checkpoints" / "step-6" / "meta.json").write_text("{}")
    (jobs[0].run_dir / "checkpoints" / "latest").write_text("step-6")
    rows = stage_rows(jobs, lambda d: None, None)
    assert (rows[0]["state"], rows[0]["checkpoint"]) == ("running", 6)  # this process wrote it: alive
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = json.loads((jobs[0].run_dir / "status.json").read_text())
    (jobs[0].run_dir / "status.json").write_text(json.dumps({**record, "pid": int(gone.stdout)}))
    rows = stage_rows(jobs, lambda d: None, None)
    assert (rows[0]["state"], rows[0]["step"], rows[0]["checkpoint"]) == ("lost", 8, 6)
    # Another host's record cannot be checked from here: it stays as written.
    (jobs[0].run_dir / "status.json").write_text(json.dumps({**record, "pid": int(gone.stdout), "host": "elsewhere"}))
    assert stage_rows(jobs, lambda d: None, None)[0]["state"] == "running"
    # Nor a container's with this host's name (its pids are its own).
    (jobs[0].run_dir / "status.json").write_text(json.dumps({**record, "pid": int(gone.stdout),
                                                             "pid_namespace": "pid:[1]"}))
    assert stage_rows(jobs, lambda d: None, None)[0]["state"] == "running"


def test_status_command(tmp_path):
    jobs = _jobs(tmp_path)
    _write_status(jobs[0].run_dir, "finished", 6, 0.5)
    env = job_env(tmp_path)
    rows = json.loads(launch(["status", "--json", "--stages", STAGES, f"run.root={tmp_path}"], env).stdout)
    assert [(r["stage"], r["state"], r["run_dir"]) for r in rows] == [
        ("a", "finished", str(jobs[0].run_dir)), ("b", "not started", str(jobs[1].run_dir)),
        ("c", "not started", str(jobs[2].run_dir))]
    one = launch(["status", "stage=mini_test", f"run.dir={jobs[0].run_dir}"], env).stdout.splitlines()
    assert one[1].split()[:4] == ["mini_test", "finished", "6/6", "0.5000"]
