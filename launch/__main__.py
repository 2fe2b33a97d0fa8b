"""`python -m launch {torchrun,slurm,chain,status} [options] [hydra overrides]` (see launch/README.md).

    python -m launch torchrun stage=mini_test 'stage.data.shards="/data/{00000..00003}.tar"'
    python -m launch slurm cluster=reference_32x8 cluster.partition=gpu stage=v1-2 ... [--dry-run]
    python -m launch chain cluster=reference_32x8 run.name=sd-v1 'v1-2:stage.data.shards=...' [--dry-run]
    python -m launch status run.name=sd-v1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from launch import chain, slurm
from launch.config import ConfigError, StageJob, stage_job
from launch.precompute import PrecomputeJob, precompute_argv
from launch.sbatch import render, render_precompute
from launch.status import format_table, stage_rows
from launch.torchrun import free_port, is_loopback, shell_join, store_host, torchrun_argv, worker_env
from train.status import read_status


def _python(job: StageJob | PrecomputeJob, *, runs_setup: bool) -> str:
    """cluster.python if given; else `python` where the job makes its own environment (`cluster.setup`
    in a Slurm job, or `cluster.exec_prefix`'s container), whose interpreter is the one on its PATH;
    else the one running the launcher (its venv, on a file system the nodes share)."""
    c = job.cluster
    if c.python:
        return c.python
    return "python" if c.exec_prefix or (runs_setup and c.setup) else sys.executable


def _master_addr(args, nodes: int) -> str:
    """The rendezvous address: this host for one node; for several, the first node's, given explicitly."""
    if nodes == 1:
        return args.master_addr or "127.0.0.1"
    if args.master_addr is None:
        raise ConfigError(f"cluster.nodes={nodes}: pass --master-addr, the first node's address (the same on "
                          "every node)")
    if is_loopback(args.master_addr) and not (args.local_addr and is_loopback(args.local_addr)):
        raise ConfigError(f"cluster.nodes={nodes}: --master-addr {args.master_addr} reaches this host only; pass "
                          f"the first node's address (add --local-addr {args.master_addr} too only to run every "
                          "agent on this host)")
    return args.master_addr


def cmd_torchrun(args) -> int:
    job = stage_job(args.overrides)
    if job.precompute is not None and job.precompute.missing():
        pre = job.precompute
        make = shell_join(["torchrun", f"--nproc-per-node={pre.tasks_per_node}",
                           *precompute_argv(pre, python="python")[len(pre.cluster.exec_prefix) + 1:]])
        raise ConfigError(f"stage {job.stage} reads latent shards that are not made yet ({len(pre.missing())} of "
                          f"{len(pre.latents)} missing in {pre.out_dir}); make them on this node first (the same on "
                          f"each node, with --nnodes and a rendezvous, for several):\n  {make}")
    port = args.master_port or job.cluster.master_port
    if port is None:
        if job.cluster.nodes > 1:
            raise ConfigError("several nodes must agree on the rendezvous port: pass --master-port (the same on "
                              "every node) or set cluster.master_port")
        port = free_port()
    master = _master_addr(args, job.cluster.nodes)
    is_host = store_host(master, job.cluster.nodes) if args.is_host is None else args.is_host
    argv = torchrun_argv(job, python=_python(job, runs_setup=False), nnodes=job.cluster.nodes,
                         rdzv_endpoint=f"{master}:{port}", rdzv_id=job.rdzv_id,
                         local_addr=args.local_addr, is_host=is_host, module=args.module)
    env = worker_env(job)
    if args.dry_run:
        print(shell_join(["env", *(f"{k}={v}" for k, v in env.items()), *argv]))
        return 0
    print(f"[launch] {job.stage}: {job.cluster.nodes} node(s) x {job.cluster.gpus_per_node} -> {job.run_dir}",
          flush=True)
    os.execvpe(argv[0], argv, {**os.environ, **env})


def _submit_all(jobs: list[StageJob], args) -> int:
    """Plan (skip finished stages, never submit a queued one twice), then submit or, with --dry-run, print."""
    can_ask_slurm = not args.dry_run or shutil.which("squeue")
    active_of = slurm.active_job if can_ask_slurm else (lambda run_dir: None)
    decisions = chain.plan(jobs, status_of=read_status, active_of=active_of)
    precompute = chain.plan_precompute(decisions, active_of=active_of)

    def submit(job: StageJob | PrecomputeJob, after: str | None) -> str:
        if isinstance(job, PrecomputeJob):
            script = render_precompute(job, python=_python(job, runs_setup=True))
        else:
            script = render(job, python=_python(job, runs_setup=True), module=args.module, dependency=after)
        if args.dry_run:
            print(script)
            return f"<job of {job.stage}>"
        return slurm.submit(job, script, after)

    chain.execute(decisions, submit, precompute)
    for d in [*precompute, *decisions]:
        print(("# dry run: " if args.dry_run else "") + chain.describe(d))
    return 0


def cmd_slurm(args) -> int:
    return _submit_all([stage_job(args.overrides)], args)


def cmd_chain(args) -> int:
    return _submit_all(chain.compose_chain(chain.parse_stages(args.stages), args.overrides), args)


def cmd_status(args) -> int:
    stages = args.stages
    if stages is None and any(o.startswith("stage=") for o in args.overrides):
        jobs = [stage_job(args.overrides, strict=False)]  # `status stage=X ...`: that stage alone
    else:
        jobs = chain.compose_chain(chain.parse_stages(stages or chain.DEFAULT_STAGES), args.overrides, strict=False)
    # Outside a Slurm cluster only the status files are read.
    state = slurm.job_state if shutil.which("squeue") else None
    rows = stage_rows(jobs, slurm.read_record, state)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m train")
        return cmd

    t = add("torchrun", "run a stage here with torchrun (the same command on every node for several)")
    t.add_argument("--master-addr", default=None, help="address of the rendezvous (first) node; required for "
                   "several nodes (default for one: 127.0.0.1)")
    t.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: cluster.master_port, "
                   "else a free port on one node)")
    t.add_argument("--local-addr", default=None, help="this node's address, where its hostname does not resolve")
    t.add_argument("--is-host", action=argparse.BooleanOptionalAction, default=None,
                   help="this node's agent hosts the rendezvous store (default: yes for one node; for several, "
                   "whether --master-addr is one of this machine's addresses)")
    s = add("slurm", "submit one stage as a Slurm job (skipped if finished or already queued)")
    c = add("chain", "submit the stage chain as Slurm jobs linked by afterok; LABEL:key=value applies to one "
                     "stage only")
    c.add_argument("--stages", default=chain.DEFAULT_STAGES, help=f"comma list (default {chain.DEFAULT_STAGES}); "
                   "label=config runs a config under another stage name")
    for cmd in (t, s, c):
        cmd.add_argument("--dry-run", action="store_true", help="print what would run or be submitted")
        cmd.add_argument("--module", default="train", help="the Python module the workers run")
    st = add("status", "state, step and last loss of each stage (and its Slurm job)")
    st.add_argument("--stages", default=None, help=f"comma list (default: the stage= override, else "
                    f"{chain.DEFAULT_STAGES})")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    p.commands = sub.choices  # read by parse()
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and overrides in any order (`torchrun cluster=X --master-addr A stage=Y`): each command's
    parser reads them intermixed, which argparse cannot do through subparsers."""
    p = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in p.commands:
        return p.parse_args(argv)  # help, or the error naming the commands
    args = p.commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    commands = {"torchrun": cmd_torchrun, "slurm": cmd_slurm, "chain": cmd_chain, "status": cmd_status}
    try:
        return commands[args.command](args)
    except (ConfigError, slurm.SlurmError) as err:
        print(f"launch {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
