"""The GPU benchmark scripts run end to end at tiny size on the CPU, so a device session (15 minutes,
rare) never fails on a bug. Only that they run and report: no assertion on any timing."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from train_helpers import REPO, train_env


def _run(tmp_path, script, *args):
    proc = subprocess.run([sys.executable, f"bench/{script}", "--device", "cpu", "--arch", "tiny", "--latent", "8",
                           "--batch", "2", "--steps", "2", "--warmup", "1", "--out", str(tmp_path), *args],
                          cwd=REPO, env=train_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_unet_step_bench_measures_ours_and_diffusers(tmp_path):
    _run(tmp_path, "unet_step.py", "--impl", "ours,diffusers", "--channels-last", "both", "--dtype", "fp32",
         "--profile")
    results = json.loads((tmp_path / "unet_step.json").read_text())["results"]
    assert {(r["impl"], r["channels_last"]) for r in results} == {(i, c) for i in ("ours", "diffusers")
                                                                   for c in (False, True)}
    assert all(r["status"] == "ok" and math.isfinite(r["img_per_s"]) for r in results), results
    assert all(r["build_s"] > 0 and r["first_step_s"] > 0 for r in results), results  # where a row's time goes
    assert "ours/diffusers" in (tmp_path / "unet_step.md").read_text()
    profile = (tmp_path / "profile.md").read_text()  # one breakdown per measured row
    assert profile.count("### ") == 4 and "| convolution |" in profile and "| attention |" in profile


def test_trainer_step_bench_runs_the_trainers_step(tmp_path):
    _run(tmp_path, "trainer_step.py", "--channels-last", "--dtype", "fp32", "--backend", "ddp,fsdp")
    rows = json.loads((tmp_path / "trainer_step.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["ddp", "fsdp"] and all(r["status"] == "ok" for r in rows), rows
    assert all(math.isfinite(r["img_per_s"]) and math.isfinite(r["bare_img_per_s"]) for r in rows)
    assert all(r["build_s"] > 0 and r["first_step_s"] > 0 for r in rows), rows
    # The sync check needs CUDA (tests/test_step_sync.py covers the CPU's equivalent).
    assert all(r["syncs"] == "not checked (CPU)" for r in rows)


def test_attention_bench_times_every_call_under_each_kernel(tmp_path):
    _run(tmp_path, "attention_step.py", "--dtype", "fp32")
    report = json.loads((tmp_path / "attention_step.json").read_text())
    # Every distinct call of the tiny UNet at latent 8 (3 levels with attention and the middle block,
    # self + cross each), under torch's choice and the one SDPA kernel the CPU has; cuDNN and efficient
    # attention say they have no kernel.
    assert len(report["rows"]) == 8
    for row in report["rows"]:
        assert set(row["ms"]) == {"sdpa", "sdpa-flash"} and all(math.isfinite(v) for v in row["ms"].values())
        assert row["status"] == {"sdpa-cudnn": "no kernel", "sdpa-efficient": "no kernel"}
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["kernel"] == "sdpa-flash" and set(best["ms"]) == {"sdpa", "sdpa-flash"}


def test_attention_calls_carry_the_unets_attention_flops():
    """The shapes the attention bench times are the UNet's: their FLOPs are exactly what torch's FLOP
    counter finds in SDPA over a forward of SD v1 (forward only, so a third of train_flops)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.attention_step import attention_calls
    from models.configs import sd_v1
    from models.unet import UNetModel

    cfg = sd_v1().unet
    calls = attention_calls(cfg, 64)
    assert sum(calls.values()) == 32  # 16 SpatialTransformers, each one self- and one cross-attention
    assert {c.head_dim for c in calls} == {40, 80, 160}
    with torch.device("meta"):
        unet = UNetModel(cfg)
        with FlopCounterMode(display=False) as counter:
            unet(torch.empty(1, 4, 64, 64), torch.zeros(1, dtype=torch.long), torch.empty(1, 77, 768))
    sdpa = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" in str(op) or "bmm" in str(op))
    assert sum(c.train_flops(1) * n for c, n in calls.items()) / 3 == sdpa


def test_profile_groups_kernel_names_by_what_they_do():
    from bench.profile_step import category

    names = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "aten::convolution_backward": "convolution",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "copy / layout",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "matmul",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "triton_per_fused_native_group_norm_silu_0": "compiled (triton)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
        "void at::native::(anonymous namespace)::native_group_norm_kernel<float>": "norm",
        "void at::native::direct_copy_kernel_cuda": "copy / layout",
        "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>": "other",
    }
    assert {n: category(n) for n in names} == names


def test_largest_micro_batch_is_read_off_a_line_through_the_peaks():
    """Peak memory = fixed + per image x batch: the second session's H200 rows (35.2 GiB at 32 images,
    12.8 GiB of weights and AdamW state) put 0.7 GiB on each image, so 80 GiB holds 96."""
    sys.path.insert(0, str(REPO))
    from bench.unet_step import Result, largest_batches

    def row(batch, gib, impl="ours", status="ok"):
        return Result(impl, "sd-v1", 64, batch, "bf16", True, True, "none", peak_mem_gib=gib, status=status)

    rows = [row(8, 12.8 + 8 * 0.7), row(32, 12.8 + 32 * 0.7), row(64, math.nan, status="OOM"),
            row(16, 30.0, impl="diffusers")]  # diffusers has one batch only: no line
    text = largest_batches(rows, 80.0)
    assert text.count("| ours |") == 1 and "| diffusers |" not in text
    assert "| 8,32 | 12.8 | 0.700 | 96 |" in text
    assert largest_batches(rows[2:]) == ""  # nothing measured twice: no table


def test_vae_encode_bench_reports_every_layout(tmp_path):
    proc = subprocess.run([sys.executable, "bench/vae_encode.py", "--device", "cpu", "--arch", "tiny", "--resolution",
                           "64", "--batch", "2", "--dtype", "fp32,bf16", "--steps", "2", "--warmup", "1", "--out",
                           str(tmp_path)], cwd=REPO, env=train_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "vae_encode.json").read_text())["rows"]
    assert [(r["dtype"], r["channels_last"]) for r in rows] == [("fp32", False), ("fp32", True), ("bf16", False),
                                                                 ("bf16", True)]
    assert all(r["status"] == "ok" and r["img_per_s"] > 0 and r["tflops"] > 0 for r in rows), rows
