"""tools/plan_cost.py: the plan's arithmetic against numbers worked out by hand (the issue's image counts,
the MosaicML preset's hours), the inverse round trip, the command line and its refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import plan_cost
from tools.plan_cost import FlopsModel, Hardware, PlanError, Stage

REPO = Path(__file__).resolve().parents[1]
A100_PEAK = 312e12  # dense bf16, FLOP/s
CLUSTER_32X8 = Hardware(gpu="A100", dtype="bf16", nodes=32, gpus_per_node=8)
# The issue's plan: 237k steps x 2048 at 256; (194k + 515k + 195k) x 2048 at 512.
IMAGES_256 = 237_000 * 2048
IMAGES_512 = (194_000 + 515_000 + 195_000) * 2048


@pytest.fixture(scope="module")
def sd_v1_plan() -> list[Stage]:
    return plan_cost.stages_from_configs(plan_cost.SD_V1_STAGES)


def test_default_plan_comes_from_the_stage_configs(sd_v1_plan):
    assert [(s.name, s.steps, s.global_batch, s.resolution) for s in sd_v1_plan] == [
        ("v1-1_256", 237_000, 2048, 256), ("v1-1_512", 194_000, 2048, 512),
        ("v1-2", 515_000, 2048, 512), ("v1-3", 195_000, 2048, 512)]
    report = plan_cost.plan_cost(sd_v1_plan, CLUSTER_32X8, None)
    by_res = {t.resolution: t.images for t in report.by_resolution}
    assert by_res == {256: IMAGES_256, 512: IMAGES_512}
    # The issue's rounded figures: 485M images at 256, 1.85B at 512.
    assert round(by_res[256] / 1e6) == 485 and round(by_res[512] / 1e7) == 185
    # v1-1_256 reads images, the 512 px stages precomputed latents (conf/stage); all read captions. The
    # default count (UNet only) leaves the text encoder out and says so; the VAE encoder has its own table.
    assert [s.online_encoders for s in sd_v1_plan] == [("VAE encode", "text encode")] + [("text encode",)] * 3
    assert [s.dataset for s in sd_v1_plan] == [None, "laion-high-resolution"] + ["laion-improved-aesthetics"] * 2
    text = plan_cost.format_report(report)
    assert "v1-1_256, v1-1_512, v1-2, v1-3 run the text encoder in the loop" in text and "VAE encoder" in text
    counted = plan_cost.plan_cost(sd_v1_plan, CLUSTER_32X8, None, flops_model=FlopsModel(True, True))
    assert "in the loop" not in plan_cost.format_report(counted) and counted.vae_encoder == []


def test_vae_encoder_precomputed_and_in_the_loop_by_hand(sd_v1_plan):
    """Precomputing encodes each distinct image once; the loop encodes every sample, but costs nothing
    while a step waits for the network. The encoder is assumed at the UNet step's MFU."""
    hw = Hardware(gpu="A100", dtype="bf16", nodes=32, gpus_per_node=8, node_gbps=400.0)
    report = plan_cost.plan_cost(sd_v1_plan, hw, {256: 137.5, 512: 36.3})
    v256, hires, aesthetics = report.vae_encoder
    assert (v256.dataset, hires.dataset, aesthetics.dataset) == (
        "v1-1_256's shards", "laion-high-resolution", "laion-improved-aesthetics")
    assert (v256.stages, hires.stages, aesthetics.stages) == (("v1-1_256",), ("v1-1_512",), ("v1-2", "v1-3"))
    assert (v256.precomputed, hires.precomputed, aesthetics.precomputed) == (False, True, True)  # as shipped
    # Images to encode: the samples drawn, or the subset's rows where fewer (the model card's ~170M rows of
    # laion-high-resolution; at most LAION-Aesthetics V2 5+'s 600M for the improved-aesthetics subset).
    assert (v256.samples, v256.images) == (IMAGES_256, IMAGES_256)
    assert (hires.samples, hires.images) == (194_000 * 2048, 170_000_000)
    assert (aesthetics.samples, aesthetics.images) == ((515_000 + 195_000) * 2048, 600_000_000)
    # The encoder's seconds per image = its FLOPs / (img/s x the UNet's FLOPs per image).
    encode_s = {res: plan_cost.vae_encode_flops_per_image(res) / (ips * FlopsModel().per_image(res))
                for res, ips in ((256, 137.5), (512, 36.3))}
    assert hires.precompute_gpu_hours == pytest.approx(170e6 * encode_s[512] / 3600)
    assert v256.precompute_gpu_hours == pytest.approx(IMAGES_256 * encode_s[256] / 3600)
    # In the loop at 256 px: 8 images per GPU compute in 58 ms + 8 x 3.7 ms of encoder, under the 100 ms
    # the network takes (tools/plan_network.py): free. At 512 px the step computes longer than the network
    # waits, so every sample's encoder adds its time.
    assert 8 / 137.5 + 8 * encode_s[256] < hw.network_s < 8 / 36.3
    assert v256.loop_gpu_hours == 0
    assert hires.loop_gpu_hours == pytest.approx(194_000 * 2048 * encode_s[512] / 3600)
    assert report.vae_encoder_gpu_hours == pytest.approx(hires.precompute_gpu_hours + aesthetics.precompute_gpu_hours)
    assert "training + VAE encoder as the stages run it: " in plan_cost.format_report(report)
    # Without a throughput only the image counts are known.
    assert plan_cost.plan_cost(sd_v1_plan, hw, None).vae_encoder[1].precompute_gpu_hours is None
    assert {v.throughput for v in report.vae_encoder} == {"assumed"}


def test_vae_encoder_at_its_measured_throughput(sd_v1_plan):
    """bench/vae_encode.py's img/s replaces the UNet-MFU assumption where given; a precompute needs no
    UNet throughput, the loop does (it shares the step)."""
    hw = Hardware(gpu="A100", dtype="bf16", nodes=32, gpus_per_node=8, node_gbps=400.0)
    report = plan_cost.plan_cost(sd_v1_plan, hw, {256: 137.5, 512: 36.3}, vae_img_per_s={512: 50.0})
    v256, hires, aesthetics = report.vae_encoder
    assert (v256.throughput, hires.throughput, aesthetics.throughput) == ("assumed", "measured", "measured")
    assert hires.precompute_gpu_hours == pytest.approx(170e6 / 50.0 / 3600)
    assert aesthetics.precompute_gpu_hours == pytest.approx(600e6 / 50.0 / 3600)
    assert hires.loop_gpu_hours == pytest.approx(194_000 * 2048 / 50.0 / 3600)  # 512 px steps compute longer
    assert v256.precompute_gpu_hours == plan_cost.plan_cost(sd_v1_plan, hw, {256: 137.5, 512: 36.3}).vae_encoder[
        0].precompute_gpu_hours
    text = plan_cost.format_report(report)
    assert "the encoder's img/s measured at 512 px (--vae-img-per-s), assumed at the UNet step's MFU elsewhere" in text
    alone = plan_cost.plan_cost(sd_v1_plan, hw, None, vae_img_per_s={512: 50.0}).vae_encoder[1]
    assert alone.precompute_gpu_hours == pytest.approx(hires.precompute_gpu_hours) and alone.loop_gpu_hours is None
    with pytest.raises(plan_cost.PlanError, match="--vae-img-per-s item '512': write RESOLUTION"):
        plan_cost.parse_img_per_s("512", "--vae-img-per-s")


def test_gpu_hours_on_a_small_plan_by_hand():
    stages = [Stage("a", steps=100, global_batch=64, resolution=256),
              Stage("b", steps=50, global_batch=32, resolution=512)]
    hw = Hardware(gpu="A100", dtype="bf16", nodes=2, gpus_per_node=4)
    report = plan_cost.plan_cost(stages, hw, {256: 16.0, 512: 4.0}, budget_gpu_hours=1.0)
    a, b = report.stages
    # a: 6,400 images / 16 img/s = 400 GPU-seconds; b: 1,600 / 4 = 400 GPU-seconds.
    assert (a.images, b.images) == (6400, 1600)
    assert a.gpu_hours == pytest.approx(400 / 3600) and b.gpu_hours == pytest.approx(400 / 3600)
    assert report.total_gpu_hours == pytest.approx(800 / 3600)
    assert report.total_wall_hours == pytest.approx(800 / 3600 / 8)
    # MFU = img/s x FLOPs per image / peak, with the FLOPs the trainer uses (UNet fwd + bwd).
    assert a.mfu == pytest.approx(16.0 * a.flops_per_image / A100_PEAK)
    assert b.mfu == pytest.approx(4.0 * b.flops_per_image / A100_PEAK)
    assert report.budget.meets_budget and report.budget.plan_to_budget == pytest.approx(800 / 3600)


def test_flops_per_image_match_the_issue():
    """UNet fwd+bwd ~537 / 2,407 GFLOP (train/flops.py); VAE encode 273 / 1,117; text encoder 13."""
    assert FlopsModel().per_image(256) == pytest.approx(537e9, rel=0.01)
    assert FlopsModel().per_image(512) == pytest.approx(2407e9, rel=0.01)
    assert plan_cost.vae_encode_flops_per_image(256) == pytest.approx(273e9, rel=0.005)
    assert plan_cost.vae_encode_flops_per_image(512) == pytest.approx(1117e9, rel=0.005)
    assert plan_cost.text_encode_flops_per_caption() == pytest.approx(13e9, rel=0.05)
    online = FlopsModel(vae_encode=True, text_encode=True).per_image(512)
    assert online == pytest.approx(FlopsModel().per_image(512) + plan_cost.vae_encode_flops_per_image(512)
                                   + plan_cost.text_encode_flops_per_caption())


def test_required_throughput_round_trips(sd_v1_plan):
    budget = 10_000.0
    needed = plan_cost.plan_cost(sd_v1_plan, CLUSTER_32X8, None, budget_gpu_hours=budget).budget
    # Independently: required MFU = total FLOPs / (budget seconds x peak).
    f256, f512 = FlopsModel().per_image(256), FlopsModel().per_image(512)
    assert needed.required_mfu == pytest.approx((IMAGES_256 * f256 + IMAGES_512 * f512) / (budget * 3600 * A100_PEAK))
    # Running at the required throughput spends exactly the budget, at that MFU everywhere.
    again = plan_cost.plan_cost(sd_v1_plan, CLUSTER_32X8, needed.required_img_per_s, budget_gpu_hours=budget)
    assert again.total_gpu_hours == pytest.approx(budget)
    assert all(c.mfu == pytest.approx(needed.required_mfu) for c in again.stages)
    assert again.budget.meets_budget is not None and again.budget.plan_to_budget == pytest.approx(1.0)
    assert needed.wall_hours_at_budget == pytest.approx(budget / 256)


def test_the_inverse_holds_where_steps_wait_for_the_network(sd_v1_plan):
    """With the collectives modelled (FSDP2, 400 Gbit/s per node) the 256 px steps wait for the network at
    any MFU, so the budget's throughput is solved with each step max(compute, network) long: fed back,
    it spends the budget; and the stated speed-up, applied to a throughput, meets it exactly."""
    hw = Hardware(gpu="A100", dtype="bf16", nodes=32, gpus_per_node=8, node_gbps=400.0)
    budget = 10_000.0
    needed = plan_cost.plan_cost(sd_v1_plan, hw, None, budget_gpu_hours=budget).budget
    again = plan_cost.plan_cost(sd_v1_plan, hw, needed.required_img_per_s, budget_gpu_hours=budget)
    assert again.total_gpu_hours == pytest.approx(budget, rel=1e-9)
    assert again.stages[0].compute_ms_per_step < again.stages[0].network_ms_per_step  # the floor is in play
    # Compute-only FLOPs / budget would have said 42.1%, which spends ~11,100 hours here.
    assert needed.required_mfu > 0.45
    preset = plan_cost.THROUGHPUT_PRESETS["mosaicml-a100"].img_per_s
    slow = plan_cost.plan_cost(sd_v1_plan, hw, preset, budget_gpu_hours=budget).budget
    assert slow.meets_budget is False and slow.speedup_to_budget > slow.plan_to_budget
    sped = {res: v * slow.speedup_to_budget for res, v in preset.items()}
    assert plan_cost.plan_cost(sd_v1_plan, hw, sped).total_gpu_hours == pytest.approx(budget, rel=1e-9)
    # A budget the collectives alone exceed has no answer, and says so.
    out_of_reach = plan_cost.plan_cost(sd_v1_plan, hw, preset, budget_gpu_hours=5_000.0).budget
    assert out_of_reach.required_mfu is None and out_of_reach.speedup_to_budget is None
    assert "no speed-up of the compute reaches it" in "\n".join(plan_cost._format_budget(out_of_reach, hw, 8107.0))


def test_mosaicml_preset_hours(sd_v1_plan):
    preset = plan_cost.THROUGHPUT_PRESETS["mosaicml-a100"]
    report = plan_cost.plan_cost(sd_v1_plan, CLUSTER_32X8, preset.img_per_s)
    by_hand_s = 485_376_000 / 137.5 + 1_851_392_000 / 36.3
    assert report.total_gpu_hours == pytest.approx(by_hand_s / 3600, rel=1e-12)
    assert report.total_wall_hours == pytest.approx(by_hand_s / 3600 / 256, rel=1e-12)
    assert report.budget.meets_budget is False  # ~15,150 A100-hours against the 10,000 goal


def test_cli_prints_the_table_and_the_total(capsys):
    assert plan_cost.main(["--throughput", "mosaicml-a100", "--gpu", "A100", "--nodes", "32",
                           "--gpus-per-node", "8", "--node-gbps", "0"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    hours = (485_376_000 / 137.5 + 1_851_392_000 / 36.3) / 3600
    assert f"{hours:,.0f}" in total and "2.337B" in total
    assert "NOT MET" in out and "MFU 42.1%" in out


def test_collective_floor_by_hand(sd_v1_plan):
    """(N-1)/N x each collective's bytes through each node's NICs per step (tools/plan_network.py); the
    parameter count is the released checkpoint's (tests/assets/sd_v1_state_dict.json)."""
    from tools.plan_network import collective_seconds, unet_parameter_count

    released = json.loads((REPO / "tests/assets/sd_v1_state_dict.json").read_text())["param_counts"]["unet"]
    assert unet_parameter_count() == released == 859_520_964
    ring, link = 31 / 32, 50e9  # 32 nodes; 400 Gbit/s = 50 GB/s per node
    ddp = ring * 2 * released * 4 / link  # all-reduce (reduce-scatter + all-gather) of fp32 gradients: ~133 ms
    assert collective_seconds(32, 400.0, "ddp") == pytest.approx(ddp)
    assert collective_seconds(32, 400.0, "ddp", "bf16") == pytest.approx(ddp / 2)
    # FSDP2 / ZeRO-2: reduce-scatter of fp32 gradients + one all-gather of bf16 parameters; resharding
    # after the forward (or ZeRO-3) gathers them a second time.
    assert collective_seconds(32, 400.0, "fsdp") == pytest.approx(ring * released * (4 + 2) / link)
    assert collective_seconds(32, 400.0, "fsdp-reshard") == pytest.approx(ring * released * (4 + 2 + 2) / link)
    assert collective_seconds(32, 400.0, "zero3", "bf16") == pytest.approx(ring * released * (2 + 2 + 2) / link)
    assert collective_seconds(1, 400.0) == 0.0 and collective_seconds(32, 0.0) == 0.0

    hw = Hardware(gpu="A100", dtype="bf16", nodes=32, gpus_per_node=8, node_gbps=400.0, backend="ddp")
    report = plan_cost.plan_cost(sd_v1_plan, hw, plan_cost.THROUGHPUT_PRESETS["mosaicml-a100"].img_per_s)
    at_256, at_512 = report.stages[0], report.stages[1]
    # 8 images per GPU per step: 58 ms of compute at 256 px waits for the network; 220 ms at 512 hides it.
    assert at_256.compute_ms_per_step == pytest.approx(8 / 137.5 * 1e3)
    assert at_256.compute_ms_per_step < at_256.network_ms_per_step == pytest.approx(1e3 * ddp)
    assert at_256.gpu_hours == pytest.approx(237_000 * ddp * 256 / 3600)
    assert at_256.img_per_s_effective == pytest.approx(8 / ddp)
    assert at_512.gpu_hours == pytest.approx(194_000 * 2048 / 36.3 / 3600)
    assert report.network_floor_gpu_hours == pytest.approx(1_141_000 * ddp * 256 / 3600)  # ~10,800


def test_cli_says_when_the_network_alone_exceeds_the_budget(capsys):
    assert plan_cost.main(["--throughput", "mosaicml-a100", "--backend", "ddp"]) == 0  # 32 x 8, 400 Gbit/s
    out = capsys.readouterr().out
    assert "ddp moves 6.88 GB per step" in out and "58 / 133" in out and "OUT OF REACH" in out
    assert plan_cost.main(["--throughput", "mosaicml-a100"]) == 0  # the trainer's default, FSDP2
    out = capsys.readouterr().out
    assert "fsdp moves 5.16 GB per step" in out and "58 / 100" in out and "OUT OF REACH" not in out
    assert plan_cost.main(["--throughput", "mosaicml-a100", "--nodes", "8", "--reduce-dtype", "bf16"]) == 0
    assert "OUT OF REACH" not in capsys.readouterr().out


def test_cli_json_and_custom_plan(capsys):
    assert plan_cost.main(["--plan", "a:100:64:256,b:50:32:512", "--img-per-s", "256=16,512=4",
                           "--nodes", "2", "--gpus-per-node", "4", "--budget-gpu-hours", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_gpu_hours"] == pytest.approx(800 / 3600)
    assert data["hardware"]["world_size"] == 8 and data["budget"]["meets_budget"] is True
    assert set(data["budget"]["required_img_per_s"]) == {"256", "512"}


def test_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "tools.plan_cost", "--budget-gpu-hours", "10000"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # 47.8%: the steps at 256 px wait for the network (42.1% without it, --node-gbps 0).
    assert "budget 10,000 A100-hours" in proc.stdout and "MFU 47.8%" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "B200"], "unknown GPU 'B200': choose one of A100"),
    (["--img-per-s", "256=137.5"], "no throughput for resolution 512 (stages v1-1_512, v1-2, v1-3)"),
    (["--img-per-s", "256:137.5"], "write RESOLUTION=IMAGES_PER_S"),
    (["--img-per-s", "256=0,512=1"], "must be positive"),
    (["--throughput", "nope"], "choose one of mosaicml-a100"),
    (["--throughput", "mosaicml-a100", "--gpu", "H100"], "measured on A100, not H100"),
    (["--throughput", "mosaicml-a100", "--img-per-s", "256=1"], "not both"),
    (["--plan", "a:10:8:100"], "multiple of 64"),
    (["--plan", "a:10:8"], "name:steps:global_batch:resolution"),
    (["--stages", "v1-9"], "Could not find 'stage/v1-9'"),
    (["--gpu", "V100", "--dtype", "bf16"], "no bf16"),
    (["--nodes", "0"], "must be >= 1"),
    (["--node-gbps", "-1"], "must be >= 0"),
    (["--budget-gpu-hours", "0"], "must be positive"),
])
def test_bad_input_is_refused_with_a_reason(argv, message, capsys):
    assert plan_cost.main(argv) == 2
    assert message in capsys.readouterr().err


def test_api_raises_plan_error(sd_v1_plan):
    with pytest.raises(PlanError, match="no throughput for resolution 512"):
        plan_cost.plan_cost(sd_v1_plan, CLUSTER_32X8, {256: 137.5})
    with pytest.raises(PlanError, match="--backend 'horovod' one of ddp, fsdp"):
        plan_cost.plan_cost(sd_v1_plan, Hardware("A100", "bf16", 32, 8, backend="horovod"), None)
    with pytest.raises(PlanError, match="unknown GPU"):
        plan_cost.plan_cost(sd_v1_plan, Hardware("TPU", "bf16", 1, 1), {256: 1.0, 512: 1.0})
