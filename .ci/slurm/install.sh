#!/usr/bin/env bash
# Installs Debian's Slurm (22.05) and munge if they are missing, and says how long it took.
# Packages only: start.sh starts the daemons, under a temp directory, with their own config.
set -euo pipefail
t0=$(date +%s%N)
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
    echo "slurm: already installed ($(slurmctld -V))"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurm-wlm munge >/dev/null
echo "slurm: installed $(slurmctld -V) in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
