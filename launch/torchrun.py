"""torchrun command lines: one node, or many (the same command on every node, c10d rendezvous).

Used directly by `python -m launch torchrun` and, with shell variables for the addresses, inside the
sbatch script. Design points:
- c10d rendezvous on the first node's address, also for one node, so 1 and N nodes take one path;
- the agent that hosts the rendezvous store is named (`--rdzv-conf=is_host=`): torchrun's own guess
  compares the endpoint with getaddrinfo(gethostname()), which misses where a node's name resolves to
  127.0.0.1 or to another interface than the one in the endpoint; then no agent hosts the store and
  every one of them fails with RendezvousConnectionError after its timeout;
- `--max-restarts`: a crashed worker restarts the whole group, which resumes from `checkpoints/latest`;
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 because restarted workers otherwise read stale gloo addresses
  from the shared rendezvous store and hang (pytorch #135712, #167288; FIELD_NOTES);
- `--signals-to-handle` adds SIGUSR1 (torchrun's agent dies on it by default): the agent then passes the
  pre-emption signal to its workers, waits up to `--shutdown-timeout` for their checkpoint, and stops
  without restarting them.
"""
from __future__ import annotations

import ipaddress
import shlex
import socket
from typing import Sequence

from launch.config import REQUEUE_MARGIN_S, ConfigError, StageJob

HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


class Shell(str):
    """A word for the shell to expand (it holds "$VAR"s): quoted with "", never with ''."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a one-node rendezvous; several nodes must be told one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(addr: str) -> bool:
    """`addr` as written names this host only (127.0.0.0/8, ::1, localhost)."""
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def is_this_host(addr: str) -> bool:
    """`addr` (a name or an address) is one of this machine's addresses: binding to it succeeds only
    here, whatever this machine's own name resolves to."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--master-addr {addr}: does not resolve on this node ({err}); pass the first "
                          "node's address") from err
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind((sockaddr[0], 0))
                return True
            except OSError:  # EADDRNOTAVAIL: another machine's address
                continue
    return False


def store_host(master_addr: str, nnodes: int) -> bool | None:
    """Whether this agent hosts the c10d store: the only agent does; of several, the one on the machine
    owning `master_addr`. None (torchrun's guess, which falls back to joining as a client when the port
    is taken) for a loopback address: every agent is on this host and any one of them may host."""
    if nnodes == 1:
        return True
    if is_loopback(master_addr):
        return None
    return is_this_host(master_addr)


def _opt(name: str, value: str | int) -> str:
    word = f"{name}={value}"
    return Shell(word) if isinstance(value, Shell) else word


def shell_join(words: Sequence[str]) -> str:
    return " ".join(f'"{w}"' if isinstance(w, Shell) else shlex.quote(w) for w in words)


def torchrun_argv(job: StageJob, *, python: str, nnodes: int | str, rdzv_endpoint: str, rdzv_id: str,
                  local_addr: str | None = None, is_host: bool | Shell | None = None,
                  module: str = "train") -> list[str]:
    """`python -m torch.distributed.run ... -m <module> <overrides>` as a list of words; `is_host`: this
    agent hosts the rendezvous store (a Shell word expands to 1 or 0; None leaves it to torchrun)."""
    c = job.cluster
    argv = [*c.exec_prefix, python, "-m", "torch.distributed.run",
            _opt("--nnodes", nnodes), _opt("--nproc-per-node", c.gpus_per_node),
            "--rdzv-backend=c10d", _opt("--rdzv-endpoint", rdzv_endpoint), _opt("--rdzv-id", rdzv_id),
            _opt("--max-restarts", c.max_restarts), f"--signals-to-handle={HANDLED_SIGNALS}",
            _opt("--shutdown-timeout", c.signal_grace_s - REQUEUE_MARGIN_S)]
    if is_host is not None:
        value = Shell(f"is_host={is_host}") if isinstance(is_host, Shell) else f"is_host={int(is_host)}"
        argv.append(_opt("--rdzv-conf", value))
    if local_addr is not None:
        argv.append(_opt("--local-addr", local_addr))
    return argv + ["-m", module, *job.overrides]


def worker_env(job: StageJob) -> dict[str, str]:
    """Environment for torchrun and its workers; the cluster's `env` wins over these defaults."""
    c = job.cluster
    env = {
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        # torchrun would force 1 thread per worker; give each its share of the task's CPUs instead.
        "OMP_NUM_THREADS": str(max(1, c.cpus_per_task // c.gpus_per_node)),
    }
    env.update({k: str(v) for k, v in c.env.items()})
    return env
