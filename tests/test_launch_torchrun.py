"""torchrun command lines (one node, many nodes, the environment), and two torchrun agents on this host
(`--nnodes=2`, c10d rendezvous on 127.0.0.1) started by `python -m launch torchrun` running the real
trainer's mini stage."""
from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
from torch.distributed.run import _parse_rendezvous_config, get_args_parser

from launch.__main__ import main as launch_main
from launch.config import REQUEUE_MARGIN_S, stage_job
from launch.torchrun import Shell, free_port, shell_join, store_host, torchrun_argv, worker_env
from slurm_cluster import (JOB_TIMEOUT_S, REPO, assert_same_weights, job_env, launch, read_status, reference_run,
                           shards, unet_weights, wait_for)

__all__ = ["reference_run", "shards"]  # fixtures, imported for pytest

SHARDS = "stage.data.shards='/data/{00000..00003}.tar'"


def _job(*overrides: str):
    return stage_job(["stage=mini_test", SHARDS, *overrides])


def _opts(argv: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in argv if w.startswith("--") and "=" in w)


def test_one_node_command():
    job = _job("cluster.gpus_per_node=2", "cluster.max_restarts=2", "cluster.signal_grace_s=120")
    argv = torchrun_argv(job, python="/venv/bin/python", nnodes=1, rdzv_endpoint="127.0.0.1:29400",
                         rdzv_id=job.rdzv_id)
    assert argv[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    opts = _opts(argv)
    assert opts["--nnodes"] == "1" and opts["--nproc-per-node"] == "2"
    assert opts["--rdzv-backend"] == "c10d" and opts["--rdzv-endpoint"] == "127.0.0.1:29400"
    assert opts["--max-restarts"] == "2"
    assert "SIGUSR1" in opts["--signals-to-handle"].split(",")  # else the agent dies on SLURM's warning
    assert opts["--shutdown-timeout"] == str(120 - REQUEUE_MARGIN_S)
    # The trainer gets the user's overrides unchanged, and the run folder as an absolute path.
    i = argv.index("train")
    assert argv[i - 1] == "-m"
    assert argv[i + 1:] == ["stage=mini_test", SHARDS, "cluster.gpus_per_node=2", "cluster.max_restarts=2",
                            "cluster.signal_grace_s=120", f"run.dir={job.run_dir}"]
    assert Path(job.run_dir).is_absolute()


def test_many_nodes_share_one_rendezvous():
    job = _job("cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.device=cuda", "stage.global_batch=64",
               "stage.micro_batch=2", "cluster.exec_prefix=[apptainer,exec,--nv,/img/sd.sif]")
    argv = torchrun_argv(job, python="python", nnodes=4, rdzv_endpoint="10.0.0.1:29500", rdzv_id=job.rdzv_id,
                         local_addr="10.0.0.7", module="tools.evaluate")
    assert argv[:5] == ["apptainer", "exec", "--nv", "/img/sd.sif", "python"]
    opts = _opts(argv)
    assert (opts["--nnodes"], opts["--nproc-per-node"], opts["--local-addr"]) == ("4", "8", "10.0.0.7")
    assert argv[argv.index("-m", 6) + 1] == "tools.evaluate"
    # Every node computes the same rendezvous id from the same command.
    assert job.rdzv_id == _job("cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.device=cuda",
                               "stage.global_batch=64", "stage.micro_batch=2",
                               "cluster.exec_prefix=[apptainer,exec,--nv,/img/sd.sif]").rdzv_id


def test_environment_defaults_and_cluster_env():
    env = worker_env(_job("cluster.cpus_per_task=8", "cluster.gpus_per_node=2", "+cluster.env.NCCL_DEBUG=INFO"))
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # elastic restarts hang without it
    assert env["OMP_NUM_THREADS"] == "4" and env["NCCL_DEBUG"] == "INFO"
    assert worker_env(_job("+cluster.env.OMP_NUM_THREADS=1"))["OMP_NUM_THREADS"] == "1"


def test_shell_words_quote_literals_and_expand_variables():
    words = ["run.dir=/a b", "x='y'", Shell("--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT")]
    text = shell_join(words)
    assert shlex.split(text) == ["run.dir=/a b", "x='y'", "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT"]
    assert text.endswith('"--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT"')


def test_dry_run_prints_the_command(tmp_path):
    out = launch(["torchrun", "--dry-run", "--master-port", "29999", "stage=mini_test", SHARDS,
                  f"run.dir={tmp_path}/run"], job_env(tmp_path)).stdout
    words = shlex.split(out)
    assert words[0] == "env" and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in words
    assert "--rdzv-endpoint=127.0.0.1:29999" in words and f"run.dir={tmp_path}/run" in words
    assert not (tmp_path / "run").exists()


def test_several_nodes_need_an_agreed_port(tmp_path):
    with pytest.raises(AssertionError, match="--master-port"):
        launch(["torchrun", "--dry-run", "stage=mini_test", SHARDS, "cluster.nodes=2"], job_env(tmp_path))


def _dry_run(capsys, *args: str) -> tuple[int, list[str], str]:
    """`python -m launch torchrun --dry-run ARGS` in this process: exit code, the command's words, stderr."""
    rc = launch_main(["torchrun", "--dry-run", *args])
    out, err = capsys.readouterr()
    return rc, shlex.split(out), err


def test_options_and_overrides_mix_in_any_order(capsys, tmp_path):
    """The README's several-node command: overrides before and after the options."""
    rc, words, err = _dry_run(capsys, "cluster=reference_32x8", "--master-addr", "10.0.0.1", "--master-port", "29500",
                              "stage=mini_test", SHARDS, "stage.global_batch=512", f"run.dir={tmp_path}/run")
    assert rc == 0, err
    assert "--rdzv-endpoint=10.0.0.1:29500" in words and "--nnodes=32" in words
    assert words[words.index("train") + 1:] == ["cluster=reference_32x8", "stage=mini_test", SHARDS,
                                                "stage.global_batch=512", f"run.dir={tmp_path}/run"]


@pytest.mark.parametrize("args, message", [
    ([], "cluster.nodes=2: pass --master-addr"),
    (["--master-addr", "127.0.0.1"], "--master-addr 127.0.0.1 reaches this host only"),
    (["--master-addr", "localhost", "--local-addr", "10.0.0.7"], "--master-addr localhost reaches this host only"),
])
def test_several_nodes_need_the_first_nodes_address(capsys, args, message):
    rc, _, err = _dry_run(capsys, "--master-port", "29999", "stage=mini_test", SHARDS, "cluster.nodes=2", *args)
    assert rc == 2 and message in err


def test_every_agent_on_this_host_is_said_explicitly(capsys):
    """Loopback for several nodes only with a loopback --local-addr (the tests' two agents on one host);
    torchrun picks the agent hosting the store then (the others join as clients)."""
    rc, words, err = _dry_run(capsys, "--master-addr", "127.0.0.1", "--local-addr", "127.0.0.1", "--master-port",
                              "29999", "stage=mini_test", SHARDS, "cluster.nodes=2")
    assert rc == 0, err
    assert "--rdzv-endpoint=127.0.0.1:29999" in words and not any(w.startswith("--rdzv-conf") for w in words)


def _address_of_this_machine() -> str:
    """A non-loopback IPv4 address of one of this machine's interfaces."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    raise AssertionError("this test needs a network interface with a non-loopback IPv4 address")


def test_the_agent_owning_the_master_address_hosts_the_store():
    here = _address_of_this_machine()
    assert store_host(here, 1) is True and store_host("127.0.0.1", 1) is True  # the only agent
    assert store_host(here, 4) is True
    assert store_host("203.0.113.7", 4) is False  # TEST-NET-3: another machine's
    assert store_host("127.0.0.1", 2) is None  # every agent here: torchrun picks one


def test_the_store_is_hosted_where_the_hostname_resolves_elsewhere(monkeypatch, capsys):
    """A node whose name resolves to 127.0.0.1 (as on many VMs) while the endpoint is its interface's
    address: torchrun's guess (getaddrinfo(gethostname()) against the endpoint) says "not the host", so
    no agent hosts the store and the rendezvous fails after its timeout. The rendezvous backend torch
    builds from our command line must host the store itself."""
    here = _address_of_this_machine()
    rc, words, err = _dry_run(capsys, "--master-addr", here, "--local-addr", here, "--master-port",
                              str(free_port()), "stage=mini_test", SHARDS)
    assert rc == 0, err
    args = get_args_parser().parse_args(words[words.index("torch.distributed.run") + 1:])
    params = RendezvousParameters(backend=args.rdzv_backend, endpoint=args.rdzv_endpoint, run_id=args.rdzv_id,
                                  min_nodes=1, max_nodes=1, local_addr=args.local_addr, read_timeout=5,
                                  **_parse_rendezvous_config(args.rdzv_conf))
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    _, store = create_backend(params)  # without is_host: RendezvousConnectionError after read_timeout
    store.set("probe", b"1")
    assert store.get("probe") == b"1"


def test_two_agents_on_one_host_train_the_mini_stage(reference_run):
    """The session's reference run is exactly this: two `python -m launch torchrun` agents."""
    status = read_status(reference_run)
    assert status["state"] == "finished" and status["step"] == status["total_steps"] == 6
    assert (reference_run / "export" / "model.ckpt").is_file()
    assert (reference_run / "checkpoints" / "latest").read_text().strip() == "step-6"


def test_a_crashed_worker_restarts_the_group_from_the_last_checkpoint(shards, reference_run, tmp_path):
    """`cluster.max_restarts`: kill -9 one worker after the step-3 checkpoint; torchrun restarts both
    workers, which resume from `latest` and end exactly like the uninterrupted run."""
    run_dir = tmp_path / "run"
    args = ["torchrun", "stage=mini_test", shards, "parallel.precision=fp32", "cluster.max_restarts=1",
            f"run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=REPO, env=job_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        latest = run_dir / "checkpoints" / "latest"
        wait_for(lambda: latest.is_file() and latest.read_text().strip() == "step-3", JOB_TIMEOUT_S,
                 "the step-3 checkpoint", lambda: f"exit {proc.poll()}")
        workers = psutil.Process(proc.pid).children()  # the launcher exec'd torchrun: these are its workers
        assert len(workers) == 2
        workers[1].send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-5000:]
    assert f"resumed from {run_dir}/checkpoints/step-3 at step 3" in out, out[-5000:]
    assert read_status(run_dir)["state"] == "finished"
    assert_same_weights(unet_weights(run_dir), unet_weights(reference_run))
