#!/usr/bin/env bash
# The whole GPU measurement for one device session (H100/H200): our UNet training step against
# diffusers' at 256 and 512 px, eager, channels-last and torch.compile.
# Needs the carried wheels in .whl/ (diffusers, importlib_metadata; the GPU image has torch and the hub client).
# Results land in $OUT/<phase>/unet_step.{json,md}.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
B="python3 bench/unet_step.py --device cuda --arch sd-v1 --dtype bf16 --steps 6 --warmup 2"
$B --latent 32 --batch 32,128 --budget-s 50 --out "$OUT/eager256"
$B --latent 64 --batch 16,32 --budget-s 50 --out "$OUT/eager512"
$B --latent 64 --batch 16 --channels-last yes --out "$OUT/chlast512"
$B --latent 64 --batch 16 --compile yes --budget-s 150 --out "$OUT/compile512"
