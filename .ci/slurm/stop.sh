#!/usr/bin/env bash
# Stops what start.sh DIR started, by the PIDs it recorded: SIGTERM, up to 10 s to exit, then SIGKILL.
# Slurm daemons first, munged last (they authenticate through it while shutting down).
# Removes the loopback address only if start.sh added it. Safe to call twice or after a failed start.
# Usage: stop.sh DIR [--remove]     (--remove also deletes DIR)
set -uo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 DIR [--remove]" >&2; exit 2; }
dir=$1

stop_pids() {  # TERM them all, then wait for each (bounded), then KILL what is left
    local pid
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "$@"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null && echo "stop.sh: $pid did not stop on SIGTERM, killed" >&2
    done
}

slurm=() munge=()
if [[ -f $dir/pids ]]; then
    while read -r name pid; do
        # Only a PID that still runs that daemon: never one the system has since given to another process.
        [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == "${name%%-*} "* ]] || continue
        if [[ $name == munged ]]; then munge+=("$pid"); else slurm+=("$pid"); fi
    done <"$dir/pids"
fi
stop_pids "${slurm[@]}"
stop_pids "${munge[@]}"
if [[ -f $dir/added_lo_addr ]]; then
    ip addr del "$(cat "$dir/added_lo_addr")" dev lo 2>/dev/null || true
    rm -f "$dir/added_lo_addr"
fi
[[ ${2:-} == --remove ]] && rm -rf "$dir"
exit 0
