"""Compose the config exactly as `python -m train` does, and check what the launcher needs of it.

Checks run on the login node, before anything is queued: a missing shard path or an impossible batch
split fails here in a second instead of on 256 GPUs after a day in the queue.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from launch.precompute import PrecomputeJob, precompute_job
from train import main as train_main  # importing it registers the schema ("train_schema") with Hydra
from train.config import ClusterConfig, ConfigError, check_frozen_sources, validate
from train.overrides import for_hydra, later_wins

REPO = Path(__file__).resolve().parents[1]
# The last seconds of the pre-emption grace belong to the batch shell (read status, requeue); the
# workers get the rest to finish their step and checkpoint.
REQUEUE_MARGIN_S = 30
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M:S
_MEM = re.compile(r"^\d+[KMGT]?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class StageJob:
    """One stage, ready to launch: where it writes, where it runs, and what the trainer is told."""

    name: str  # run.name + stage.name: the Slurm job name
    stage: str
    run_dir: Path  # absolute, so the login node, every node and the status command agree
    cluster: ClusterConfig
    overrides: tuple[str, ...]  # for `python -m train`; ends with run.dir=<absolute run_dir>
    # The job making its latent shards (stage.data.precompute_from), if it has one.
    precompute: PrecomputeJob | None = None
    # Where the launcher ran: every relative path in the overrides and the config (run.root's default
    # "runs", a relative from_checkpoint or shard list) means a path under it, so the job runs there too.
    workdir: Path = field(default_factory=Path.cwd)

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.gpus_per_node

    @property
    def rdzv_id(self) -> str:
        """The same on every node that runs the same command (c10d rendezvous key)."""
        return "sd-" + hashlib.sha1(str(self.run_dir).encode()).hexdigest()[:12]


def compose_config(overrides: Sequence[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=train_main.CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=for_hydra(overrides))


def stage_job(overrides: Sequence[str], *, strict: bool = True) -> StageJob:
    """Compose; with `strict`, also refuse what the trainer would refuse at start-up (missing values,
    batch split, world size) and what Slurm would refuse (see check_cluster)."""
    try:
        cfg = compose_config(overrides)
    except ConfigError:
        raise
    except Exception as err:  # Hydra's errors name the bad override; add where the options are
        raise ConfigError(f"{err} (config groups live in {train_main.CONF_DIR})") from err
    run_dir = Path(str(cfg.run.dir)).expanduser().absolute()
    cluster: ClusterConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ClusterConfig), cfg.cluster))
    precompute = None
    if strict:
        typed = train_main.to_dataclass(cfg)
        validate(typed, cluster.nodes * cluster.gpus_per_node)
        check_frozen_sources(typed, on_disk=False)  # the files may be on the nodes only
        check_cluster(cluster)
        check_first_shard(typed.stage.data, str(cfg.stage.name))
        precompute = precompute_job(typed, cluster)
    else:  # `launch status`: values may be missing (???), a precompute setting may be half given
        try:
            precompute = precompute_job(train_main.to_dataclass(cfg), cluster)
        except (ConfigError, MissingMandatoryValue, ValueError):
            precompute = None
    pinned = later_wins(overrides, [f"run.dir={run_dir}"])
    return StageJob(name=f"{cfg.run.name}.{cfg.stage.name}", stage=str(cfg.stage.name), run_dir=run_dir,
                    cluster=cluster, overrides=tuple(pinned), precompute=precompute)


def check_first_shard(data, stage: str) -> None:
    """The stage's first shard (and first held-out shard), where it is a local file already: images where
    the stage reads latents (the 512 px SD stages do) or the reverse, or latents of another resolution,
    fail here rather than after the job's wait in the queue. Remote (`pipe:`) shards, and shards not made
    yet (a chain's later stages), are left to the loader, which checks every shard it reads."""
    from data.loader import expand_shards
    from data.samples import WrongShardKind, check_shard_kind

    for setting, shards in (("stage.data.shards", data.shards), ("stage.data.val_shards", data.val_shards)):
        if shards is None:
            continue
        first = expand_shards(shards)[0]
        if first.startswith("pipe:") or not Path(first.removeprefix("file:")).is_file():
            continue
        try:
            check_shard_kind(first, data.latents, data.resolution // 8, setting=setting)
        except WrongShardKind as err:
            raise ConfigError(f"stage {stage}: {err}") from err


def time_limit_s(text: str) -> int:
    """Seconds in a Slurm --time value (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-H[:M[:S]]
        h, m, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def check_cluster(c: ClusterConfig) -> None:
    """What the launcher needs to be true; each message says which setting to change."""
    if c.nodes < 1 or c.gpus_per_node < 1:
        raise ConfigError(f"cluster.nodes={c.nodes}, cluster.gpus_per_node={c.gpus_per_node}: both must be >= 1")
    if c.device not in ("cuda", "cpu"):
        raise ConfigError(f"cluster.device={c.device!r}: choose cuda or cpu")
    if c.cpus_per_task < 1:
        raise ConfigError(f"cluster.cpus_per_task={c.cpus_per_task}: must be >= 1 (the whole node's share: one "
                          "task per node runs torchrun and all its workers)")
    if not _TIME.match(c.time_limit):
        raise ConfigError(f"cluster.time_limit={c.time_limit!r}: use a Slurm time such as 48:00:00 or 2-00:00:00")
    if c.signal_grace_s < 2 * REQUEUE_MARGIN_S:
        raise ConfigError(f"cluster.signal_grace_s={c.signal_grace_s}: use at least {2 * REQUEUE_MARGIN_S} "
                          f"(workers get grace - {REQUEUE_MARGIN_S} s to checkpoint, Slurm may signal up to 60 s late)")
    if c.signal_grace_s >= time_limit_s(c.time_limit):
        raise ConfigError(f"cluster.signal_grace_s={c.signal_grace_s} is not shorter than cluster.time_limit="
                          f"{c.time_limit}: the job would be told to stop as it starts; lower the grace or raise "
                          "the limit")
    if c.mem is not None and not _MEM.match(str(c.mem)):
        raise ConfigError(f"cluster.mem={c.mem!r}: use a Slurm size per node such as 500G, or 0 for all of it")
    if c.master_port is not None and not 1024 <= c.master_port <= 65535:
        raise ConfigError(f"cluster.master_port={c.master_port}: choose a port in 1024..65535, or null")
    if c.max_restarts < 0 or c.max_requeues < 0:
        raise ConfigError(f"cluster.max_restarts={c.max_restarts}, cluster.max_requeues={c.max_requeues}: "
                          "must be >= 0")
    for key in c.env:
        if not _ENV_NAME.match(key):
            raise ConfigError(f"cluster.env.{key}: not a valid environment variable name")
    for arg in c.sbatch_args:
        if not arg.startswith("--") or any(ch.isspace() for ch in arg):
            # Hydra reads an unquoted `=` inside a list as a syntax error: the elements need quotes.
            raise ConfigError(f"cluster.sbatch_args: {arg!r} must be one long option without spaces, "
                              "e.g. \"cluster.sbatch_args=['--constraint=a100']\" (quote each element)")
    for name, value in (("partition", c.partition), ("account", c.account)):
        if value is not None and (not value or any(ch.isspace() for ch in value)):
            raise ConfigError(f"cluster.{name}={value!r}: must be a Slurm name without spaces, or null")
