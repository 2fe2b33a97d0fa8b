#!/usr/bin/env bash
# The whole GPU measurement for one device session (H100/H200, <= 9 minutes): our UNet training step
# against diffusers' at 512 and 256 px: eager baselines, then each side's best settings
# (bf16 autocast, SDPA, channels-last, torch.compile per block), then our selective activation
# checkpointing at a micro-batch that needs it.
# Needs the carried wheels in .whl/ (diffusers, importlib_metadata; the GPU image has torch and the hub client).
# Results land in $OUT/<phase>/unet_step.{json,md}; $OUT/log.txt has everything printed.
set -uo pipefail
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
B="python3 bench/unet_step.py --device cuda --arch sd-v1 --dtype bf16 --steps 5 --warmup 2"
START=$SECONDS
$B --latent 64 --batch 32 --budget-s 60 --out "$OUT/eager512"
$B --latent 64 --batch 32 --compile yes --channels-last yes --budget-s 200 --out "$OUT/best512"
$B --latent 32 --batch 128 --compile yes --channels-last yes --budget-s 120 --out "$OUT/best256"
$B --latent 64 --batch 64,96 --impl ours --ac selective,full --compile yes --channels-last yes --budget-s 100 \
    --out "$OUT/ac512"
echo "total ${SECONDS}s since the first measurement started: $((SECONDS - START))s"
