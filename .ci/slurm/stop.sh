#!/usr/bin/env bash
# Stops what start.sh DIR started, by the PIDs it recorded: SIGTERM, up to 10 s to exit, then SIGKILL.
# Removes the loopback address only if start.sh added it. Safe to call twice or after a failed start.
# Usage: stop.sh DIR [--remove]     (--remove also deletes DIR)
set -uo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 DIR [--remove]" >&2; exit 2; }
dir=$1
pids=()
if [[ -f $dir/pids ]]; then
    # slurmd first, munged last: the others authenticate through it while shutting down.
    while read -r name pid; do
        [[ $name == slurmd-* ]] && pids+=("$pid")
    done <"$dir/pids"
    while read -r name pid; do [[ $name == slurmctld ]] && pids+=("$pid"); done <"$dir/pids"
    while read -r name pid; do [[ $name == munged ]] && pids+=("$pid"); done <"$dir/pids"
fi
for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null && echo "stop.sh: $pid did not stop on SIGTERM, killed" >&2
done
if [[ -f $dir/added_lo_addr ]]; then
    ip addr del "$(cat "$dir/added_lo_addr")" dev lo 2>/dev/null || true
    rm -f "$dir/added_lo_addr"
fi
[[ ${2:-} == --remove ]] && rm -rf "$dir"
exit 0
