#!/usr/bin/env bash
# Starts a 2-node Slurm cluster on this one host, as root, with everything under DIR:
#   munged with its own key and socket, slurmctld, and two slurmd (nodes n1 and n2; Debian's build
#   has MULTIPLE_SLURMD, so each slurmd takes its node name with -N and listens on its own port).
# No cgroups (proctrack/linuxproc, task/none), no accounting, no system files touched.
# Writes DIR/env (source it: SLURM_CONF for the clients) and DIR/pids (what stop.sh kills, by PID).
# Usage: start.sh DIR        (stop with: stop.sh DIR)
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "start.sh: must run as root (slurmd starts jobs as their submitter)" >&2; exit 1; }
t0=$(date +%s%N)
dir=$(realpath -m "$1")
mkdir -p "$dir"/{etc,munge,state,log,spool/n1,spool/n2}
chmod 700 "$dir" "$dir/munge"
: >"$dir/pids"
host=$(hostname -s)

# slurmd resolves node addresses with AI_ADDRCONFIG, which ignores 127.0.0.1: in a network namespace
# that has only loopback it fails ("Address family not supported by protocol") until lo has a second
# IPv4 address. Only then is one added, and stop.sh removes only what was added here.
if command -v ip >/dev/null && ! ip -4 -o addr show | awk '{print $4}' | grep -qv '^127\.0\.0\.1/'; then
    ip addr add 127.0.0.2/8 dev lo
    echo "127.0.0.2/8" >"$dir/added_lo_addr"
fi

# Three free TCP ports, taken together so they differ (other clusters may run on this host).
read -r ctld_port n1_port n2_port < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)

dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
socket="$dir/munge/munge.socket"

cat >"$dir/etc/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: how long a revoked job credential blocks the job id on the nodes, which is how long a
# requeued job must wait before it can start again (default 120 s). Short here, so tests need not wait.
AuthInfo=socket=$socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Schedule every second (default 60): a requeued or newly eligible job starts at once in tests.
SchedulerParameters=sched_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
InactiveLimit=0
KillWait=30
MinJobAge=600
# Job ids (and so the default rendezvous port, 20000 + id % 20000) differ between clusters on one host.
FirstJobId=$(( 1000 + RANDOM % 18000 ))
MailProg=/bin/true
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n1_port CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n2_port CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
echo "export SLURM_CONF=$dir/etc/slurm.conf" >"$dir/env"
export SLURM_CONF="$dir/etc/slurm.conf"

# Foreground daemons (-F / -D) in the background, so that $! is the daemon's own PID.
munged -F --force --socket="$socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munged.pid" \
    --seed-file="$dir/munge/munged.seed" --log-file="$dir/log/munged.log" </dev/null >>"$dir/log/munged.out" 2>&1 &
echo "munged $!" >>"$dir/pids"
for _ in $(seq 100); do [[ -S $socket ]] && break; sleep 0.1; done
[[ -S $socket ]] || { echo "start.sh: munged did not create $socket; see $dir/log/munged.log" >&2; exit 1; }

slurmctld -D -i </dev/null >>"$dir/log/slurmctld.out" 2>&1 &
echo "slurmctld $!" >>"$dir/pids"
for node in n1 n2; do
    slurmd -D -N "$node" </dev/null >>"$dir/log/slurmd-$node.out" 2>&1 &
    echo "slurmd-$node $!" >>"$dir/pids"
done

# Ready when both nodes are idle (bounded: 30 s).
for _ in $(seq 150); do
    idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$' || true)
    [[ $idle -eq 2 ]] && break
    sleep 0.2
done
if [[ ${idle:-0} -ne 2 ]]; then
    echo "start.sh: nodes not idle after 30 s:" >&2
    sinfo -N -l >&2 || true
    tail -n 20 "$dir"/log/*.log >&2 || true
    exit 1
fi
echo "slurm: 2 nodes up under $dir in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
