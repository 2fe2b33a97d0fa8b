"""The rendered sbatch script: its directives, and its behaviour, run by bash with stand-in `srun`,
`scontrol` and `scancel` on PATH (the real Slurm runs it in test_launch_slurm.py): what it does when
the stage finished, failed, crashed, was stopped by Slurm, or got the pre-emption warning."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.run import _parse_rendezvous_config, get_args_parser

from launch.__main__ import main as launch_main
from launch.config import REPO, stage_job
from launch.sbatch import directives, render
from slurm_cluster import job_env, launch, wait_for

SHARDS = "stage.data.shards='/data/x {00000..00003}.tar'"  # a space and braces: quoting must survive

FAKE_SRUN = r"""#!/bin/bash
printf '%s\n' "$@" > "$FAKE/srun.args"
echo $$ > "$FAKE/srun.pid"
if [[ -n ${FAKE_NODE_MAIN:-} ]]; then SLURMD_NODENAME=${FAKE_NODE:-n2} "${@: -3}"; exit $?; fi
if [[ -n ${FAKE_WAIT_FOR_SIGNAL:-} ]]; then
    for _ in $(seq 300); do [[ -f $FAKE/signalled ]] && break; sleep 0.05; done
fi
if [[ -n ${FAKE_STATE:-} ]]; then
    printf '{\n "state": "%s",\n "step": 3\n}\n' "$FAKE_STATE" > "$FAKE_RUN_DIR/status.json"
fi
exit "${FAKE_RC:-0}"
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE/scontrol.calls"
case "$1 $2" in
    "show hostnames") printf 'n1\nn2\n' ;;
    "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.0.0.${3#n} NodeHostName=host-$3 Port=0" ;;
esac
"""
FAKE_SCANCEL = r"""#!/bin/bash
echo "$*" >> "$FAKE/scancel.calls"
touch "$FAKE/signalled"
"""
FAKE_PYTHON = r"""#!/bin/bash
printf '%s\0' "$@" > "$FAKE/python.argv"
env > "$FAKE/python.env"
"""


def _job(*overrides: str, run_dir: Path | None = None):
    extra = [f"run.dir={run_dir}"] if run_dir else []
    return stage_job(["stage=mini_test", SHARDS, "cluster.nodes=2", "cluster.gpus_per_node=1", *overrides, *extra])


@pytest.fixture
def fake_slurm(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL),
                       ("python", FAKE_PYTHON)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    return fake


def _script(tmp_path, fake, *overrides: str) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    script.write_text(render(_job(*overrides, run_dir=run_dir), python=str(fake / "python")))
    return script, run_dir


def _env(fake: Path, run_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update({"PATH": f"{fake}:{env['PATH']}", "FAKE": str(fake), "FAKE_RUN_DIR": str(run_dir),
                "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2",
                "SLURM_CPUS_PER_TASK": "2", **extra})
    return env


def _calls(fake: Path, name: str) -> list[str]:
    path = fake / f"{name}.calls"
    return path.read_text().splitlines() if path.is_file() else []


def _run(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)


def test_directives_of_the_local_cluster():
    job = _job()
    lines = directives(job)
    assert "--nodes=2" in lines and "--ntasks-per-node=1" in lines and "--cpus-per-task=2" in lines
    assert "--requeue" in lines and "--signal=B:USR1@60" in lines and "--time=01:00:00" in lines
    assert f"--output={job.run_dir}/slurm/%j.out" in lines and "--open-mode=append" in lines
    assert f"--chdir={Path.cwd()}" in lines and "--job-name=sd-repro.mini_test" in lines
    assert not any(line.startswith(("--gpus", "--mem", "--partition", "--account", "--dependency")) for line in lines)


def test_directives_of_the_reference_cluster_with_site_values():
    job = stage_job(["cluster=reference_32x8", "stage=mini_test", SHARDS, "stage.global_batch=512",
                     "cluster.partition=gpu", "cluster.account=laion", "cluster.log_dir=/logs/sd"])
    lines = directives(job, dependency="1234")
    for want in ("--nodes=32", "--gpus-per-node=8", "--cpus-per-task=96", "--mem=0", "--exclusive",
                 "--partition=gpu", "--account=laion", "--time=48:00:00", "--signal=B:USR1@300",
                 "--output=/logs/sd/%j.out", "--dependency=afterok:1234", "--kill-on-invalid-dep=yes"):
        assert want in lines, want
    text = render(job, python="/venv/bin/python")
    assert "export NCCL_SOCKET_IFNAME='^lo,docker'" in text and "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text
    assert "--nproc-per-node=8" in text and "--shutdown-timeout=270" in text


@pytest.mark.parametrize("cluster", ["local", "gpu_node", "reference_32x8"])
def test_every_shipped_cluster_renders_a_valid_script(tmp_path, cluster):
    script = tmp_path / "job.sbatch"
    script.write_text(render(stage_job([f"cluster={cluster}", "stage=mini_test", SHARDS, "stage.global_batch=512"]),
                             python="python"))
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_setup_lines_run_before_training():
    text = render(_job("cluster.setup=[module load cuda/12.4,source /opt/venv/bin/activate]"), python="python")
    assert text.index("module load cuda/12.4\nsource /opt/venv/bin/activate") < text.index("node_main() {")


def test_paths_with_spaces_are_refused(tmp_path):
    with pytest.raises(ValueError, match="spaces"):
        render(_job(run_dir=tmp_path / "a b"), python="python")


def test_each_node_runs_torchrun_with_its_own_address(tmp_path, fake_slurm):
    script, run_dir = _script(tmp_path, fake_slurm)
    proc = _run(script, _env(fake_slurm, run_dir, FAKE_NODE_MAIN="1"))
    argv = (fake_slurm / "python.argv").read_text().split("\0")[:-1]
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert "--rdzv-endpoint=10.0.0.1:20042" in argv  # first node's NodeAddr; port 20000 + job id
    assert "--local-addr=10.0.0.2" in argv and "--rdzv-id=42.0" in argv and "--nnodes=2" in argv
    assert argv[argv.index("train") + 1:] == ["stage=mini_test", SHARDS, "cluster.nodes=2",
                                              "cluster.gpus_per_node=1", f"run.dir={run_dir}"]
    env = dict(line.split("=", 1) for line in (fake_slurm / "python.env").read_text().splitlines() if "=" in line)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and env["MASTER_ADDR"] == "10.0.0.1"
    srun = (fake_slurm / "srun.args").read_text().splitlines()
    assert srun[:3] == ["--ntasks-per-node=1", "--cpus-per-task=2", "--kill-on-bad-exit=0"]
    assert proc.returncode == 1  # the stand-in trained nothing: no status.json, not finished


def _node_argv(fake: Path) -> list[str]:
    return (fake / "python.argv").read_text().split("\0")[:-1]


@pytest.mark.parametrize("node, hosts", [("n1", True), ("n2", False)])
def test_the_first_nodes_agent_hosts_the_rendezvous_store(tmp_path, fake_slurm, node, hosts):
    """Named, not left to torchrun's guess (which fails where a node's name resolves to 127.0.0.1): read
    back with torchrun's own parser, as its c10d backend reads it."""
    script, run_dir = _script(tmp_path, fake_slurm)
    _run(script, _env(fake_slurm, run_dir, FAKE_NODE_MAIN="1", FAKE_NODE=node))
    args = get_args_parser().parse_args(_node_argv(fake_slurm)[2:])
    params = RendezvousParameters(backend=args.rdzv_backend, endpoint=args.rdzv_endpoint, run_id=args.rdzv_id,
                                  min_nodes=2, max_nodes=2, **_parse_rendezvous_config(args.rdzv_conf))
    assert params.get_as_bool("is_host") is hosts
    assert args.rdzv_endpoint == "10.0.0.1:20042"  # on n1 the store's address is its own


def test_the_job_runs_where_the_launcher_ran(tmp_path, fake_slurm, monkeypatch):
    """Relative paths (run.root's default, a relative override) mean the same to the launcher and the
    job: the job runs in the launcher's directory, and the project stays importable from there."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    job = _job("run.root=rel")
    assert job.run_dir == here / "rel" / "sd-repro" / "mini_test"
    assert f"--chdir={here}" in directives(job)
    script = tmp_path / "job.sbatch"
    script.write_text(render(job, python=str(fake_slurm / "python")))
    _run(script, _env(fake_slurm, job.run_dir, FAKE_NODE_MAIN="1", PYTHONPATH="/site"))
    env = dict(line.split("=", 1) for line in (fake_slurm / "python.env").read_text().splitlines() if "=" in line)
    assert env["PYTHONPATH"] == f"{REPO}:/site"
    assert f"run.dir={job.run_dir}" in _node_argv(fake_slurm)


@pytest.mark.parametrize("overrides, interpreter", [
    ([], [sys.executable]),  # the launcher's own (its venv on the shared file system)
    (["cluster.setup=[module load cuda/12.4,source /opt/venv/bin/activate]"], ["python"]),  # the setup's
    (["cluster.exec_prefix=[apptainer,exec,--nv,/img/sd.sif]"], ["apptainer", "exec", "--nv", "/img/sd.sif",
                                                                 "python"]),  # the container's
    (["cluster.setup=[source /opt/venv/bin/activate]", "cluster.python=/opt/py/bin/python3"],
     ["/opt/py/bin/python3"]),  # said explicitly
])
def test_the_interpreter_is_the_jobs_environments(tmp_path, capsys, overrides, interpreter):
    rc = launch_main(["slurm", "--dry-run", "stage=mini_test", SHARDS, f"run.dir={tmp_path}/run", *overrides])
    out, err = capsys.readouterr()
    assert rc == 0, err
    node_main = out[out.index("node_main() {"):out.index("\n}", out.index("node_main() {"))]
    words = shlex.split(node_main.split("exec ", 1)[1].replace("\\\n", " "))
    assert words[:len(interpreter) + 2] == [*interpreter, "-m", "torch.distributed.run"]


@pytest.mark.parametrize("state, rc, expected", [
    ("finished", 0, 0),  # afterok releases the next stage
    ("failed", 1, 1),  # the trainer gave up (non-finite losses): not requeued
    ("", 1, 1),  # crashed before writing a state
    ("running", 0, 1),  # srun ended but the stage did not finish
    ("preempted", 1, 75),  # Slurm stopped the job (SIGTERM): Slurm decides whether it comes back
])
def test_exit_code_follows_the_stage_state(tmp_path, fake_slurm, state, rc, expected):
    script, run_dir = _script(tmp_path, fake_slurm)
    proc = _run(script, _env(fake_slurm, run_dir, FAKE_STATE=state, FAKE_RC=str(rc)))
    assert proc.returncode == expected, proc.stdout + proc.stderr
    assert not any(c.startswith("requeue") for c in _calls(fake_slurm, "scontrol"))


def _warn(script: Path, env: dict[str, str], fake: Path) -> subprocess.CompletedProcess:
    """Run the script and send it USR1 (what --signal=B:USR1@grace does) once srun is running."""
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: (fake / "srun.pid").is_file(), 30, "srun to start")
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_preemption_warning_is_forwarded_and_the_job_requeues_itself(tmp_path, fake_slurm):
    script, run_dir = _script(tmp_path, fake_slurm)
    proc = _warn(script, _env(fake_slurm, run_dir, FAKE_WAIT_FOR_SIGNAL="1", FAKE_STATE="preempted",
                              FAKE_RC="1"), fake_slurm)
    assert proc.returncode == 0, proc.stdout
    assert _calls(fake_slurm, "scancel") == ["--signal=USR1 42"]  # every process of the job's steps
    assert "requeue 42" in _calls(fake_slurm, "scontrol")
    assert "[launch] requeueing job 42 (requeue 1 of at most 20)" in proc.stdout


def test_a_warned_job_that_died_before_checkpointing_still_requeues(tmp_path, fake_slurm):
    """It resumes from its last periodic checkpoint rather than failing the chain."""
    script, run_dir = _script(tmp_path, fake_slurm)
    proc = _warn(script, _env(fake_slurm, run_dir, FAKE_WAIT_FOR_SIGNAL="1", FAKE_STATE="running", FAKE_RC="1"),
                 fake_slurm)
    assert proc.returncode == 0 and "requeue 42" in _calls(fake_slurm, "scontrol"), proc.stdout


def test_requeues_are_bounded(tmp_path, fake_slurm):
    script, run_dir = _script(tmp_path, fake_slurm, "cluster.max_requeues=3")
    proc = _warn(script, _env(fake_slurm, run_dir, FAKE_WAIT_FOR_SIGNAL="1", FAKE_STATE="preempted", FAKE_RC="1",
                              SLURM_RESTART_COUNT="3"), fake_slurm)
    assert proc.returncode == 1 and "not requeued: 3 requeues already" in proc.stdout
    assert not any(c.startswith("requeue") for c in _calls(fake_slurm, "scontrol"))


def test_slurm_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    run_dir = tmp_path / "run"
    out = launch(["slurm", "--dry-run", "stage=mini_test", SHARDS, f"run.dir={run_dir}"], job_env(tmp_path)).stdout
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --requeue" in out
    assert shlex.quote(SHARDS) in out
    assert "# dry run: mini_test: submitted as job <job of mini_test>" in out
    assert not run_dir.exists()
