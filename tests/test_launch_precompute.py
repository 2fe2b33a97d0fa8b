"""A stage's latent shards made by a job before it (launch/precompute.py): what the job runs and which
settings it refuses, the rendered script run under a stand-in srun (one task per GPU, each its share), the
chain's one job per latent folder and its afterok dependencies, the torchrun command suggested when the
shards are missing (run here with torchrun), and the status rows. test_launch_slurm.py runs the chain on
a real Slurm."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from data.precompute import PrecomputeConfig, load_models, precompute_shards
from data.synth import write_synthetic_shards
from launch.chain import compose_chain, execute, parse_stages, plan, plan_precompute
from launch.config import ConfigError, stage_job
from launch.precompute import PRECOMPUTE_DIR
from launch.sbatch import render_precompute
from train.overrides import later_wins
from launch.status import stage_rows
from slurm_cluster import REPO, assert_latents_of, job_env, recording_submitter

RESOLUTION = 64


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_synthetic_shards(folder, num_shards=3, samples_per_shard=2, image_size=RESOLUTION, seed=3)
    return folder


def _latent_stage(images, latents, *changes):
    return later_wins(["stage=mini_test", f"stage.data.shards='{latents}/{{00000..00002}}.tar'",
                       "stage.data.latents=true", f"stage.data.precompute_from='{images}/{{00000..00002}}.tar'"],
                      changes)


def test_the_job_makes_the_stage_latents_with_the_stage_vae(images, tmp_path):
    job = stage_job(_latent_stage(images, tmp_path / "lat", "model.pretrained_first_stage='~/sd-v1-1.ckpt'",
                                  "cluster.gpus_per_node=2", "cluster.cpus_per_task=8")).precompute
    assert job.out_dir == tmp_path / "lat" and job.run_dir == tmp_path / "lat" / PRECOMPUTE_DIR
    assert job.latents == tuple(tmp_path / "lat" / f"0000{i}.tar" for i in range(3)) and len(job.missing()) == 3
    assert job.args == (f"{images}/{{00000..00002}}.tar", "--out", str(tmp_path / "lat"), "--checkpoint",
                        os.path.expanduser("~/sd-v1-1.ckpt"), "--arch", "tiny", "--resolution", "64",
                        "--dtype", "bfloat16", "--no-progress", "--no-text")
    assert job.cpus_per_task == 4 and job.stage == "mini_test/precompute"
    fp32 = stage_job(_latent_stage(images, tmp_path / "lat", "stage.data.context=true", "parallel.precision=fp32",
                                   "run.seed=3")).precompute
    assert "--no-text" not in fp32.args and fp32.args[3:6] == ("--random", "--seed", "3")
    assert fp32.args[fp32.args.index("--dtype") + 1] == "float32"
    assert stage_job(["stage=mini_test", f"stage.data.shards='{images}/00000.tar'"]).precompute is None
    parts = stage_job(_latent_stage(images, tmp_path / "lat", "stage.data.context=true", "model.pretrained_vae=/kl-f8.ckpt",
                                    "model.pretrained_text_encoder=/clip")).precompute
    assert parts.args[3:7] == ("--vae", "/kl-f8.ckpt", "--text-encoder", "/clip")


@pytest.mark.parametrize("change, message", [
    (["stage.data.latents=false"], "makes latent shards, but stage.data.latents=false reads images"),
    (["stage.data.shards='{L}/{00000..00001}.tar'"], "must list the same file names in the same order"),
    (["stage.data.shards='{L}/{00000..00001}.tar,{L}/x/00002.tar'"], "latent shards in 2 folders"),
    (["stage.data.shards='pipe:cat {L}/{00000..00002}.tar'"], "pipe: URL"),
    # A later stage takes its frozen parts from the previous export, which does not exist yet when the
    # latents are made: they need the VAE named.
    (["model.arch=sd-v1", "stage.init.from_checkpoint=/prev/export"],
     "set model.pretrained_first_stage to the SD v1 checkpoint"),
    (["model.arch=mini"], "this arch has none"),
    (["stage.data.context=true", "model.pretrained_vae=/kl-f8.ckpt"], "set model.pretrained_text_encoder beside"),
])
def test_settings_the_job_cannot_serve_are_refused(images, tmp_path, change, message):
    change = [c.replace("{L}", str(tmp_path / "lat")) for c in change]
    with pytest.raises(ConfigError, match=message):
        stage_job(_latent_stage(images, tmp_path / "lat", *change))


def test_latent_shards_named_as_the_images_are_refused(images, tmp_path):
    vae, _ = load_models(None, arch="tiny")
    precompute_shards(images, tmp_path / "made", vae, config=PrecomputeConfig(resolution=RESOLUTION, text=False,
                                                                             decode_workers=1), progress=False)
    with pytest.raises(ConfigError, match="00000.tar holds latents, not images: point it at the image shards"):
        stage_job(["stage=mini_test", f"stage.data.shards='{tmp_path}/lat/{{00000..00002}}.tar'",
                   "stage.data.latents=true", f"stage.data.precompute_from='{tmp_path}/made/{{00000..00002}}.tar'"])


def test_the_script_runs_one_task_per_gpu_each_its_share(images, tmp_path):
    """The rendered script under a stand-in srun that starts its tasks as Slurm would (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID): together they write every latent shard, as one process would."""
    job = stage_job(_latent_stage(images, tmp_path / "lat", "cluster.gpus_per_node=2",
                                  "cluster.cpus_per_task=2")).precompute
    script = render_precompute(job, python=sys.executable)
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=2" in directives and "#SBATCH --cpus-per-task=1" in directives
    assert not any("gpus" in d or "dependency" in d for d in directives)  # cluster=local: CPU, no afterok
    assert f"#SBATCH --chdir={Path.cwd()}" in directives  # where relative paths meant what they mean here
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/bash\nshift  # --cpus-per-task\npids=()\n"
                               "for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=2 \"$@\" & pids+=($!); done\n"
                               "rc=0; for p in \"${pids[@]}\"; do wait $p || rc=1; done; exit $rc\n")
    (fake / "srun").chmod(0o755)
    env = job_env(tmp_path, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1",
                  SLURM_CPUS_PER_TASK="1")
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not job.missing() and "[launch] precompute exited 0" in proc.stdout
    parts = sorted(p.name for p in tmp_path.glob("lat.precompute-*-of-2.json"))
    assert parts == ["lat.precompute-0-of-2.json", "lat.precompute-1-of-2.json"]
    # The trainer's VAE: random from run.seed, built the way the trainer builds it; bf16 as the stage.
    assert_latents_of(load_models(None, arch="tiny", seed=0)[0], images, tmp_path / "lat", ["00000.tar", "00002.tar"],
                      tmp_path / "here", dtype="bfloat16", resolution=RESOLUTION)


def _chain(images, tmp_path, *extra):
    """a reads images; b and c read the latents of the same images (v1-1_256 -> v1-1_512 -> v1-2 shape)."""
    lat = tmp_path / "lat"
    scoped = [f"{label}:{o}" for label in "bc" for o in _latent_stage(images, lat)[1:]]
    return compose_chain(parse_stages("a=mini_test,b=mini_test,c=mini_test"),
                         [f"stage.data.shards='{images}/{{00000..00002}}.tar'", f"run.root={tmp_path}/runs",
                          *scoped, *extra])


def test_one_job_per_latent_folder_and_the_stages_wait_for_it(images, tmp_path):
    jobs = _chain(images, tmp_path)
    decisions = plan(jobs, status_of=lambda d: None, active_of=lambda d: None)
    precompute = plan_precompute(decisions, active_of=lambda d: None)
    assert [(d.job.stage, d.action) for d in precompute] == [("b/precompute", "submit")]
    submit, submitted = recording_submitter()
    execute(decisions, submit, precompute)
    assert submitted == [("b/precompute", None), ("a", None), ("b", "102:101"), ("c", "103:101")]


def test_made_latents_or_a_queued_job_are_not_submitted_again(images, tmp_path):
    jobs = _chain(images, tmp_path)
    pre = jobs[1].precompute
    decisions = plan(jobs, status_of=lambda d: None, active_of=lambda d: None)
    queued = plan_precompute(decisions, active_of={pre.run_dir: "55"}.get)
    assert [(d.action, d.job_id) for d in queued] == [("queued", "55")]
    submit, submitted = recording_submitter()
    execute(decisions, submit, queued)
    assert submitted == [("a", None), ("b", "101:55"), ("c", "102:55")]

    pre.out_dir.mkdir()
    for path in pre.latents:
        path.write_bytes(b"")
    made = plan_precompute(plan(jobs, status_of=lambda d: None, active_of=lambda d: None), active_of=lambda d: "9")
    assert [d.action for d in made] == ["finished"]
    decisions = plan(jobs, status_of=lambda d: {"state": "finished"} if d == jobs[0].run_dir else None,
                     active_of=lambda d: None)
    submit, submitted = recording_submitter()
    execute(decisions, submit, plan_precompute(decisions, active_of=lambda d: None))
    assert submitted == [("b", None), ("c", "101")]


def test_finished_stages_need_no_latents(images, tmp_path):
    jobs = _chain(images, tmp_path)
    decisions = plan(jobs, status_of=lambda d: {"state": "finished"}, active_of=lambda d: None)
    assert plan_precompute(decisions, active_of=lambda d: None) == []


def test_two_stages_making_one_folder_differently_are_refused(images, tmp_path):
    jobs = _chain(images, tmp_path, "c:stage.data.resolution=128")
    decisions = plan(jobs, status_of=lambda d: None, active_of=lambda d: None)
    with pytest.raises(ConfigError, match="both make latent shards in .* but differently"):
        plan_precompute(decisions, active_of=lambda d: None)


def test_torchrun_says_how_to_make_the_missing_latents_and_that_command_works(images, tmp_path, capsys):
    from launch.__main__ import main as launch_main

    stage = _latent_stage(images, tmp_path / "lat", "cluster.gpus_per_node=2")
    assert launch_main(["torchrun", "--dry-run", *stage]) == 2
    refused = capsys.readouterr().err
    assert "reads latent shards that are not made yet (3 of 3 missing" in refused
    command = shlex.split(refused.strip().splitlines()[-1])
    assert command[:2] == ["torchrun", "--nproc-per-node=2"] and command[-2:] == ["--part", "env"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *command[1:]], cwd=REPO,
                          env=job_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stage_job(stage).precompute.missing() == []
    assert launch_main(["torchrun", "--dry-run", *stage]) == 0


def test_status_lists_the_latents_job_once_before_its_first_stage(images, tmp_path):
    jobs = _chain(images, tmp_path)
    jobs[1].precompute.out_dir.mkdir()
    jobs[1].precompute.latents[0].write_bytes(b"")
    rows = stage_rows(jobs, read_record=lambda d: {"job_id": "12"} if d.name == PRECOMPUTE_DIR else None,
                      job_state=lambda job_id: "RUNNING")
    assert [(r["stage"], r["state"], r["step"], r["total_steps"], r["job"], r["slurm"]) for r in rows] == [
        ("a", "not started", None, None, None, None), ("b/precompute", "incomplete", 1, 3, "12", "RUNNING"),
        ("b", "not started", None, None, None, None), ("c", "not started", None, None, None, None)]
