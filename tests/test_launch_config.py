"""Cluster configs: every shipped one composes and passes the launcher's checks, command-line overrides
reach it, and what Slurm or the trainer would refuse is refused on the login node with a message that
says what to change."""
from __future__ import annotations

import re
import shlex

import pytest

from launch.config import REPO, check_cluster, stage_job, time_limit_s
from train.config import ClusterConfig, ConfigError

SHARDS = "stage.data.shards='/data/{00000..00003}.tar'"
CLUSTERS = sorted(p.stem for p in (REPO / "conf" / "cluster").glob("*.yaml"))


def _job(*overrides: str, strict: bool = True):
    return stage_job(["stage=mini_test", SHARDS, *overrides], strict=strict)


def test_the_three_clusters_ship():
    assert {"local", "gpu_node", "reference_32x8"} <= set(CLUSTERS)


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_every_shipped_cluster_composes_and_passes_the_checks(cluster):
    # global_batch 512 divides by every shipped world size x micro-batch 2.
    job = _job(f"cluster={cluster}", "stage.global_batch=512")
    assert isinstance(job.cluster, ClusterConfig) and job.cluster.name == cluster
    check_cluster(job.cluster)


def test_cluster_shapes():
    local, node, ref = (_job(f"cluster={c}", "stage.global_batch=512").cluster
                        for c in ("local", "gpu_node", "reference_32x8"))
    assert (local.device, local.nodes * local.gpus_per_node) == ("cpu", 2)
    assert (node.device, node.nodes, node.gpus_per_node) == ("cuda", 1, 8)
    assert (ref.nodes, ref.gpus_per_node, ref.gpu_name) == (32, 8, "A100-SXM4-80GB")
    assert ref.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and "--exclusive" in ref.sbatch_args


def test_everything_is_overridable_from_the_command_line():
    c = _job("cluster=reference_32x8", "stage.global_batch=512", "cluster.nodes=4", "cluster.partition=gpu",
             "cluster.account=laion", "cluster.time_limit=2-00:00:00", "cluster.cpus_per_task=64",
             "cluster.mem=900G", "cluster.setup=[module load cuda]", "+cluster.env.NCCL_DEBUG_SUBSYS=INIT",
             "cluster.log_dir=/logs", "cluster.master_port=29600", "cluster.python=/opt/venv/bin/python").cluster
    assert (c.nodes, c.partition, c.account, c.time_limit, c.cpus_per_task, c.mem) == (
        4, "gpu", "laion", "2-00:00:00", 64, "900G")
    assert c.setup == ["module load cuda"] and c.env["NCCL_DEBUG_SUBSYS"] == "INIT"
    assert (c.log_dir, c.master_port, c.python) == ("/logs", 29600, "/opt/venv/bin/python")


def test_run_dir_is_absolute_and_pinned_for_the_trainer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = _job("run.name=r1")
    assert job.run_dir == tmp_path / "runs" / "r1" / "mini_test"
    assert job.overrides[-1] == f"run.dir={job.run_dir}" and job.name == "r1.mini_test"
    moved = _job("run.dir=elsewhere")
    assert moved.run_dir == tmp_path / "elsewhere"
    assert [o for o in moved.overrides if o.startswith("run.dir=")] == [f"run.dir={tmp_path / 'elsewhere'}"]


@pytest.mark.parametrize("overrides, message", [
    ([], "stage.data.shards"),  # a missing value the trainer needs
    (["stage.micro_batch=3"], "stage.global_batch=8 is not a multiple"),  # impossible batch split
    (["cluster.time_limit=tomorrow"], "cluster.time_limit='tomorrow'"),
    (["cluster.signal_grace_s=30"], "cluster.signal_grace_s=30: use at least 60"),
    (["cluster.time_limit=5", "cluster.signal_grace_s=300"], "is not shorter than cluster.time_limit"),
    (["cluster.mem=lots"], "cluster.mem='lots'"),
    (["cluster.device=tpu"], "choose cuda or cpu"),
    (["+cluster.env.BAD-NAME=1"], "not a valid environment variable name"),
    (["cluster.sbatch_args=[exclusive]"], "must be one long option"),
    (["cluster.partition=two words"], "cluster.partition"),
    (["cluster.master_port=80"], "cluster.master_port=80"),
    (["stage=no_such_stage"], "no_such_stage"),
])
def test_what_would_fail_later_fails_now_and_says_what_to_change(overrides, message):
    shards = [] if not overrides else [SHARDS]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        stage_job(["stage=mini_test", *shards, *overrides])


def _documented_overrides() -> list[str]:
    """The cluster overrides launch/README.md shows, as the shell hands them to the launcher."""
    text = (REPO / "launch" / "README.md").read_text()
    section = text[text.index("## Cluster configs"):text.index("## Design")]
    spans = re.findall(r"`([^`]+)`", section)
    return [shlex.split(span)[0] for span in spans if re.match(r'^"?\+*cluster\.[\w.]+=', span)]


def test_the_documented_overrides_work_on_every_shipped_cluster():
    documented = _documented_overrides()
    assert any(o.startswith("++cluster.env.") for o in documented) and len(documented) >= 8
    for cluster in CLUSTERS:  # reference_32x8 sets NCCL_DEBUG already: `+` would refuse it
        c = _job(f"cluster={cluster}", "stage.global_batch=512", *documented).cluster
        assert c.env["NCCL_DEBUG"] == "INFO" and c.srun_args == ["--container-image=/img/sd.sqsh"]
        assert c.sbatch_args[-1] == "--constraint=a100"


def test_the_sbatch_args_message_suggests_a_form_that_parses():
    with pytest.raises(ConfigError) as err:
        _job("cluster.sbatch_args=[exclusive]")
    suggested = shlex.split(re.search(r'e\.g\. (".*?")', str(err.value)).group(1))[0]
    assert _job(suggested).cluster.sbatch_args == ["--constraint=a100"]


def test_status_needs_no_complete_config():
    """Reading a stage's status must work without its shard paths."""
    assert stage_job(["stage=mini_test"], strict=False).stage == "mini_test"


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("10:30", 630), ("48:00:00", 172800),
                                           ("2-00", 172800), ("1-02:03", 93780), ("1-02:03:04", 93784)])
def test_slurm_time_limits(text, seconds):
    assert time_limit_s(text) == seconds



def test_the_first_shard_is_checked_for_what_the_stage_reads(tmp_path):
    """The 512 px SD stages read latent shards: pointed at image shards (as they were until they
    switched), the launcher refuses before anything is queued. Shards it cannot see are left to the loader."""
    from data.synth import write_synthetic_shards

    write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=4, image_size=64, seed=0)
    images = f"stage.data.shards='{tmp_path}/00000.tar'"
    assert stage_job(["stage=mini_test", images]).stage == "mini_test"  # images, read as images
    with pytest.raises(ConfigError, match="stage mini_test: .*00000.tar: its samples hold images, not .latent.npy "
                                          "latents: point stage.data.shards at latent shards"):
        stage_job(["stage=mini_test", images, "stage.data.latents=true"])
    with pytest.raises(ConfigError, match="stage mini_test: .*00000.tar: its samples hold images, not .latent.npy "
                                          "latents: point stage.data.val_shards at latent shards"):
        stage_job(["stage=mini_test", f"stage.data.shards='{tmp_path}/missing.tar'", "stage.data.latents=true",
                   f"stage.data.val_shards='{tmp_path}/00000.tar'", "tracking.val_every=10"])
    # Not there yet (a chain's later stage, precompute still running) or remote: the loader's to check.
    stage_job(["stage=mini_test", f"stage.data.shards='{tmp_path}/missing.tar'", "stage.data.latents=true"])
    stage_job(["stage=mini_test", "stage.data.shards='pipe:cat /nonexistent.tar'", "stage.data.latents=true"])
