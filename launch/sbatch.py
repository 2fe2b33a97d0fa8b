"""Render the sbatch script of one stage (and of the job making a stage's latent shards, at the end).

Layout: one Slurm task per node (`--ntasks-per-node=1`), each running torchrun, which starts the node's
GPU workers. Not one task per GPU, because torchrun then (1) restarts the group in place after a
worker crash (`--max-restarts`), which srun cannot, and (2) is the one process per node that receives
the pre-emption signal and passes it on to its workers, waiting for their checkpoint.

Pre-emption and the time limit (`--signal=B:USR1@grace`, `--requeue`):
1. Slurm sends USR1 to this batch shell `grace` seconds before the end (or an admin does:
   `scancel --batch --signal=USR1 JOB`). The shell traps it and sends USR1 with scancel to every
   process of the training step on every node: the torchrun agents (which handle it and stop without
   restarting) and their workers, which finish the step, checkpoint, write state "preempted" and exit 75.
2. When srun returns, the shell reads `<run.dir>/status.json` (torchrun turns every worker exit code
   into 1, so the state file is the only reliable answer) and requeues the job itself. The requeued
   job has the same id and resumes from `checkpoints/latest`.
3. When Slurm ends the job itself (pre-emption with PreemptMode=REQUEUE, `scontrol requeue`, scancel)
   every process gets SIGTERM: the workers checkpoint the same way, and whether it comes back is
   Slurm's decision, so the shell does not requeue.
"""
from __future__ import annotations

from pathlib import Path

from launch.config import REPO, ConfigError, StageJob
from launch.precompute import PrecomputeJob, precompute_argv
from launch.torchrun import Shell, shell_join, torchrun_argv, worker_env
from train.config import ClusterConfig

REQUEUE_EXIT_CODE = 75  # the trainer's "requeue me"; also this script's exit when Slurm stops the job

_BODY = r"""
set -uo pipefail  # no -e: a failed srun must still reach the decision at the end
echo "[launch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST at $(date -Is)"
@SETUP@
@ENV@
@PYTHONPATH@
RUN_DIR=@RUN_DIR@
MAX_REQUEUES=@MAX_REQUEUES@
mkdir -p "$RUN_DIR"

# The address Slurm has for a node: names need not resolve where addresses do.
node_addr() { scontrol show node "$1" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'; }
MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(node_addr "$MASTER_NODE")
MASTER_PORT=@MASTER_PORT@
export MASTER_NODE MASTER_ADDR MASTER_PORT
if [[ -z $MASTER_ADDR ]]; then echo "[launch] no NodeAddr for the first node of $SLURM_JOB_NODELIST"; exit 1; fi
# 1 on the first node, whose agent hosts the rendezvous store; 0 elsewhere. torchrun's own guess
# (its hostname's addresses against MASTER_ADDR) fails where the name resolves to 127.0.0.1.
store_host() { if [[ $SLURMD_NODENAME == "$MASTER_NODE" ]]; then echo 1; else echo 0; fi; }

# Runs once per node (srun task): torchrun with this node's own address for the rendezvous.
node_main() {
    exec @TORCHRUN@
}
export -f node_addr store_host node_main

warned=""
on_warning() {
    warned=1
    echo "[launch] USR1 at $(date -Is): every training process checkpoints and stops"
    scancel --signal=USR1 "$SLURM_JOB_ID"  # all processes of the job's steps, not this shell
}
on_term() { echo "[launch] SIGTERM at $(date -Is): Slurm is stopping the job; the workers checkpoint"; }
trap on_warning USR1
trap on_term TERM

# --kill-on-bad-exit=0: one node's agent stopping first must not kill the others mid-checkpoint.
# --cpus-per-task again: since 22.05 srun no longer inherits it from the allocation.
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=0 @SRUN_ARGS@bash -c node_main &
srun_pid=$!
# `wait` returns early whenever a trapped signal arrives: wait again until srun is gone (bounded).
for _ in $(seq 1000); do
    wait "$srun_pid"
    kill -0 "$srun_pid" 2>/dev/null || break
done
wait "$srun_pid"; rc=$?

state=$(grep -o '"state": *"[a-z]*"' "$RUN_DIR/status.json" 2>/dev/null | cut -d'"' -f4)
echo "[launch] srun exited $rc; stage state: ${state:-none}"
case $state in
    finished) exit 0 ;;
    failed) exit 1 ;;
esac
if [[ -n $warned ]]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if (( restarts >= MAX_REQUEUES )); then
        echo "[launch] not requeued: $restarts requeues already (cluster.max_requeues=$MAX_REQUEUES)"
        exit 1
    fi
    echo "[launch] requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[launch] scontrol requeue failed"
    exit @REQUEUE_EXIT@
fi
if [[ $state == preempted ]]; then exit @REQUEUE_EXIT@; fi  # stopped by Slurm, which decides what follows
exit $(( rc == 0 ? 1 : rc ))  # the stage did not finish
"""


def log_dir(job: StageJob | PrecomputeJob) -> Path:
    return Path(job.cluster.log_dir).absolute() if job.cluster.log_dir else job.run_dir / "slurm"


def _site_directives(c: ClusterConfig) -> list[str]:
    lines = []
    if c.device == "cuda":
        lines.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.mem is not None:
        lines.append(f"--mem={c.mem}")
    if c.partition:
        lines.append(f"--partition={c.partition}")
    if c.account:
        lines.append(f"--account={c.account}")
    return lines


def directives(job: StageJob, dependency: str | None = None) -> list[str]:
    c = job.cluster
    lines = [f"--job-name={job.name}", f"--nodes={c.nodes}", "--ntasks-per-node=1",
             f"--cpus-per-task={c.cpus_per_task}", f"--time={c.time_limit}",
             # One log per job id: a requeued run (same id) appends to it.
             f"--output={log_dir(job)}/%j.out", "--open-mode=append",
             "--requeue", f"--signal=B:USR1@{c.signal_grace_s}", f"--chdir={job.workdir}", *_site_directives(c)]
    if dependency:
        # "id[:id...]": all must succeed. A failed job cancels its dependents instead of leaving them pending.
        lines += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    return lines + list(c.sbatch_args)


def _word_groups(argv: list[str]) -> list[str]:
    """Render the command one option per line: `[prefix] python`, then `-m X` pairs and single words."""
    first = next(i for i, w in enumerate(argv) if w.startswith("-"))
    groups, i = [argv[:first]], first
    while i < len(argv):
        take = 2 if argv[i] == "-m" else 1
        groups.append(argv[i:i + take])
        i += take
    return [shell_join(g) for g in groups]


def _check_paths(*paths: Path) -> None:
    for path in paths:
        if any(ch.isspace() for ch in str(path)):
            raise ConfigError(f"{path}: #SBATCH lines cannot hold paths with spaces; choose run.dir / "
                              "cluster.log_dir / latent folders, and a directory to launch from, without them")


# The job runs where the launcher ran (StageJob.workdir), not in the repository: `-m train` and
# `-m data` must still import the project with an interpreter that has no install of it (cluster.setup's,
# a container's).
_PYTHONPATH = f"export PYTHONPATH={shell_join([str(REPO)])}${{PYTHONPATH:+:$PYTHONPATH}}"


def render(job: StageJob, *, python: str, module: str = "train", dependency: str | None = None) -> str:
    c = job.cluster
    _check_paths(job.run_dir, log_dir(job), job.workdir)
    argv = torchrun_argv(job, python=python, nnodes=Shell("$SLURM_NNODES"),
                         rdzv_endpoint=Shell("$MASTER_ADDR:$MASTER_PORT"),
                         rdzv_id=Shell("$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"),
                         local_addr=Shell('$(node_addr "$SLURMD_NODENAME")'), is_host=Shell("$(store_host)"),
                         module=module)
    env = worker_env(job)
    port = str(c.master_port) if c.master_port else "$((20000 + SLURM_JOB_ID % 20000))"
    srun_args = "".join(shell_join([a]) + " " for a in c.srun_args)
    body = (_BODY.replace("@SETUP@", "\n".join(c.setup))
            .replace("@ENV@", "\n".join(f"export {k}={shell_join([v])}" for k, v in env.items()))
            .replace("@PYTHONPATH@", _PYTHONPATH)
            .replace("@RUN_DIR@", shell_join([str(job.run_dir)]))
            .replace("@MAX_REQUEUES@", str(c.max_requeues))
            .replace("@MASTER_PORT@", port)
            .replace("@TORCHRUN@", " \\\n        ".join(_word_groups(argv)))
            .replace("@SRUN_ARGS@", srun_args)
            .replace("@REQUEUE_EXIT@", str(REQUEUE_EXIT_CODE)))
    header = ["#!/bin/bash",
              f"# Stage {job.stage} on cluster={c.name}: {c.nodes} x {c.gpus_per_node} {c.device} processes.",
              "# Rendered by `python -m launch`; change the config and render again rather than editing."]
    return "\n".join(header + [f"#SBATCH {d}" for d in directives(job, dependency)]) + "\n" + body


_PRECOMPUTE_BODY = r"""
set -uo pipefail
echo "[launch] precompute job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST at $(date -Is)"
@SETUP@
@ENV@
@PYTHONPATH@
# One task per GPU; each encodes every N-th image shard (N = tasks) and skips the ones already written.
srun --cpus-per-task="$SLURM_CPUS_PER_TASK" @SRUN_ARGS@@COMMAND@
rc=$?
echo "[launch] precompute exited $rc at $(date -Is)"
exit $rc
"""


def _option_lines(argv: list[str]) -> list[str]:
    """`[prefix] python -m data precompute INPUTS` on the first line, then one `--option [value]` a line."""
    first = next(i for i, w in enumerate(argv) if w.startswith("--"))
    lines, i = [argv[:first]], first
    while i < len(argv):
        take = 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
        lines.append(argv[i:i + take])
        i += take
    return [shell_join(words) for words in lines]


def render_precompute(job: PrecomputeJob, *, python: str) -> str:
    """The latent shards' job (launch/precompute.py). No pre-emption handling: `--requeue` reruns it and it
    skips what is written; the stages that need it wait for it with afterok."""
    c = job.cluster
    _check_paths(job.run_dir, log_dir(job), job.workdir)
    lines = [f"--job-name={job.name}", f"--nodes={c.nodes}", f"--ntasks-per-node={job.tasks_per_node}",
             f"--cpus-per-task={job.cpus_per_task}", f"--time={c.time_limit}",
             f"--output={log_dir(job)}/%j.out", "--open-mode=append", "--requeue", f"--chdir={job.workdir}",
             *_site_directives(c), *c.sbatch_args]
    env = {"OMP_NUM_THREADS": str(job.cpus_per_task), **{k: str(v) for k, v in c.env.items()}}
    body = (_PRECOMPUTE_BODY.replace("@SETUP@", "\n".join(c.setup))
            .replace("@ENV@", "\n".join(f"export {k}={shell_join([v])}" for k, v in env.items()))
            .replace("@PYTHONPATH@", _PYTHONPATH)
            .replace("@SRUN_ARGS@", "".join(shell_join([a]) + " " for a in c.srun_args))
            .replace("@COMMAND@", " \\\n    ".join(_option_lines(precompute_argv(job, python=python)))))
    header = ["#!/bin/bash",
              f"# Latent shards for stage {job.stage.split('/')[0]} in {job.out_dir} on cluster={c.name}: "
              f"{c.nodes} x {job.tasks_per_node} {c.device} tasks.",
              "# Rendered by `python -m launch`; change the config and render again rather than editing."]
    return "\n".join(header + [f"#SBATCH {d}" for d in lines]) + "\n" + body
