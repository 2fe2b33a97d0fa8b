"""Running the real trainer in subprocesses (torchrun, gloo on CPU) from tests."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from launch.torchrun import free_port  # noqa: F401 - the tests import it from here

REPO = Path(__file__).resolve().parents[1]


def train_env(tmp: Path) -> dict:
    # Not the test runner's own wandb service (set once a test used wandb in-process): each run has its own.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "WANDB_DIR": str(tmp), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(tmp / "cache"),
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "HF_HUB_OFFLINE": "1"})
    return env


def torchrun_cmd(overrides: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "train", *overrides]


def run_train(tmp: Path, overrides: list[str], nproc: int = 2, timeout: int = 300,
              expect: int | None = 0) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(overrides + [f"cluster.gpus_per_node={nproc}"], nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(tmp), capture_output=True, text=True, timeout=timeout)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"exit {proc.returncode} (expected {expect})\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def exported_unet(run_dir: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(run_dir / "export" / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return sd


@contextlib.contextmanager
def one_rank_group(backend: str, always: bool = False):
    """A one-rank gloo process group: FSDP2 needs one even for one rank; DDP only wraps the module (and
    reduces its gradients) when there is one, so `always` makes one for it too."""
    import torch.distributed as dist

    if backend != "fsdp" and not always:
        yield
        return
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from train.main import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["stage.data.num_workers=0", "cluster.gpus_per_node=1",
                                            "stage.global_batch=4", *overrides])


def compose_train_config(*overrides: str):
    """The TrainConfig `python -m train` would build for one CPU rank (global batch 4, no loader workers)."""
    from train.main import to_dataclass

    return to_dataclass(_compose(overrides))


def in_process_trainer(tmp_path: Path, shards: str, *overrides: str, env=None):
    """The real Trainer in this process: on one CPU rank (global batch 4, no loader workers), or as one rank
    of `env` (train.distributed.DistEnv; the global batch then 4 per rank)."""
    from omegaconf import OmegaConf

    from train.distributed import DistEnv
    from train.main import to_dataclass
    from train.trainer import Trainer

    env = env or DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = _compose([f"stage.data.shards='{shards}'", f"run.dir={tmp_path / 'run'}",
                    f"cluster.gpus_per_node={env.world_size}", f"stage.global_batch={4 * env.world_size}",
                    *overrides])
    return Trainer(to_dataclass(cfg), env, OmegaConf.to_container(cfg, resolve=True))


def in_fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawned: nothing of this one's state), returning its result. For
    DeepSpeed engines built in a test: DeepSpeed keeps its process groups in module globals, so a second
    engine in the test runner would find the first one's destroyed group. `fn` must be a module-level
    function of an importable module (a test file is one)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
