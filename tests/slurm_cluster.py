"""Fixtures for the launcher's integration tests: a real 2-node Slurm cluster on this host, the mini
run (real trainer, `stage=mini_test`, 2 nodes x 1 CPU process) and bounded polling.

The cluster: `.ci/run` starts one before the tests and exports SLURM_CONF (and REQUIRE_SLURM=1);
without it, the fixture starts its own with `.ci/slurm/start.sh` under the session's temp folder and
stops it at the end. Only where the daemons cannot run (not root, Slurm not installed) are the Slurm
tests skipped, with the reason; with REQUIRE_SLURM=1 that is a failure instead.

Fixtures are defined here and imported by the test modules (tests/ has one shared conftest that this
work does not own); session results are cached on disk so two modules share them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import pytest
import torch

from data.latent_format import decode_latent
from data.precompute import PrecomputeConfig, precompute_shards
from data.shard_io import iter_shard_samples
from data.synth import write_synthetic_shards
from train_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
CI_SLURM = REPO / ".ci" / "slurm"
JOB_TIMEOUT_S = 300  # one mini Slurm job takes ~40 s here; generous for a loaded 2-core machine


CRED_EXPIRE_S = 10  # AuthInfo=cred_expire in .ci/slurm/start.sh


def wait_for(check: Callable, timeout_s: float, what: str, details: Callable[[], str] = lambda: "",
             interval_s: float = 0.2):
    """Poll `check()` until it returns something truthy (returned), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{details()}")
        time.sleep(interval_s)


def read_status(run_dir: Path) -> dict | None:
    path = run_dir / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


def job_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for launcher and trainer subprocesses (sbatch hands it on to the job)."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "WANDB_DIR": str(tmp), "TMPDIR": str(tmp),
                "XDG_CACHE_HOME": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", **extra})
    return env


def launch(args: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`python -m launch ...`; fails the test with its output if it exits non-zero."""
    proc = subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"python -m launch {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def assert_latents_of(vae, images: str | Path, latents: Path, names: Sequence[str], scratch: Path,
                      dtype: str = "float32", resolution: int = 64) -> None:
    """The latent shards `names` in `latents` are what `vae` makes of the image shards at `dtype`:
    float16 storage, so one ulp apart at most (another VAE would be off by O(1))."""
    precompute_shards(images, scratch, vae, progress=False, config=PrecomputeConfig(
        resolution=resolution, text=False, decode_workers=1, dtype=dtype))
    for name in names:
        made, here = ({k: s["latent.npy"] for _, k, s in iter_shard_samples(str(d / name), Counter())}
                      for d in (latents, scratch))
        assert made.keys() == here.keys()
        for key in made:
            torch.testing.assert_close(decode_latent(made[key], resolution // 8),
                                       decode_latent(here[key], resolution // 8), atol=1e-3, rtol=1e-3)


def recording_submitter():
    """A stand-in for `slurm.submit` in launch.chain.execute: records (stage, dependency) and hands out
    job ids 101, 102, ..."""
    submitted = []

    def submit(job, after):
        submitted.append((job.stage, after))
        return str(100 + len(submitted))
    return submit, submitted


def mini_overrides(shards: str, run_dir: Path | None = None) -> list[str]:
    """The mini run on 2 nodes x 1 process (fp32: results are compared bitwise)."""
    ov = [shards, "parallel.precision=fp32", "cluster.nodes=2", "cluster.gpus_per_node=1",
          "cluster.cpus_per_task=1", "cluster.time_limit=00:15:00"]
    return ov + ([f"run.dir={run_dir}"] if run_dir is not None else [])


def unet_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported raw UNet (original layout, model.diffusion_model.*), without the EMA copy."""
    sd = torch.load(run_dir / "export" / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith("model.")}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """The override naming 4 synthetic shards (deterministic: made once a session)."""
    out = tmp_path_factory.getbasetemp() / "launch-shards"
    if not (out / "00003.tar").is_file():
        write_synthetic_shards(out, num_shards=4, samples_per_shard=16, image_size=64, seed=0)
    return f"stage.data.shards='{out}/{{00000..00003}}.tar'"


def run_two_agents(run_dir: Path, shards: str, tmp: Path, timeout_s: float = JOB_TIMEOUT_S) -> list[str]:
    """The mini run as two torchrun agents on this host (`--nnodes=2`, c10d on 127.0.0.1), each started
    with `python -m launch torchrun`, as one would on two nodes. Returns their outputs."""
    args = ["torchrun", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--local-addr",
            "127.0.0.1", "stage=mini_test", *mini_overrides(shards, run_dir)]
    env = job_env(tmp)
    agents = [subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + timeout_s
        outs = [a.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.communicate()
    assert [a.returncode for a in agents] == [0, 0], "\n---\n".join(o[-4000:] for o in outs)
    return outs


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, shards) -> Path:
    """The uninterrupted mini run (two agents, 2 x 1 processes): what interrupted runs must equal."""
    base = tmp_path_factory.getbasetemp() / "launch-reference"
    run_dir = base / "run"
    if (read_status(run_dir) or {}).get("state") != "finished":
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        run_two_agents(run_dir, shards, base)
    return run_dir


class SlurmCluster:
    """Client side of a running cluster: its environment (SLURM_CONF) and a few scontrol helpers."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.conf = env["SLURM_CONF"]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, StartTime, EndTime, Dependency, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def release_requeued(self, job_id: str) -> None:
        """A requeued job waits ~2 min (BeginTime) by default; start it as soon as the nodes allow.

        The nodes refuse to launch it while they still hold its revoked credential ("Job credential
        revoked", and the job ends): that lasts cred_expire seconds (10 in .ci/slurm/start.sh), so
        the start time is set just past it."""
        wait_for(lambda: self.job(job_id).get("JobState") == "PENDING", 120, f"job {job_id} to be pending again",
                 lambda: str(self.job(job_id)))
        self.run("scontrol", "update", f"JobId={job_id}", f"StartTime=now+{CRED_EXPIRE_S + 5}")

    def cancel(self, job_id: str) -> None:
        self.run("scancel", job_id, check=False)


def _responds(env: dict[str, str]) -> bool:
    try:
        proc = subprocess.run(["sinfo", "--noheader"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _cannot_start() -> str | None:
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): run .ci/slurm/install.sh as root"
    if os.geteuid() != 0:
        return "the Slurm daemons need root here (slurmd starts jobs as their submitter)"
    return None


def _unavailable(reason: str):
    if os.environ.get("REQUIRE_SLURM") == "1":
        pytest.fail(f"REQUIRE_SLURM=1 but Slurm cannot run: {reason}")
    pytest.skip(f"Slurm daemons cannot run here: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    env = dict(os.environ)
    if env.get("SLURM_CONF"):  # started by .ci/run (or by hand): use it
        if not _responds(env):
            _unavailable(f"SLURM_CONF={env['SLURM_CONF']} is set but sinfo gets no answer from slurmctld")
        yield SlurmCluster(env)
        return
    reason = _cannot_start()
    if reason:
        _unavailable(reason)
    folder = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(CI_SLURM / "start.sh"), str(folder)], capture_output=True, text=True,
                           timeout=120)
    try:
        if start.returncode != 0:
            _unavailable(f".ci/slurm/start.sh failed: {start.stdout}{start.stderr}")
        yield SlurmCluster({**env, "SLURM_CONF": str(folder / "etc" / "slurm.conf")})
    finally:
        subprocess.run(["bash", str(CI_SLURM / "stop.sh"), str(folder)], capture_output=True, timeout=120)
