"""`python -m train [hydra overrides]`: compose the config, validate it, train one stage.

    python -m train stage=v1-1_256 cluster=reference_32x8 backend=fsdp stage.data.shards='/data/{00000..09999}.tar'
    python -m train --cfg job            # print the composed config

The overrides pass through `train.overrides` first (brace patterns quoted for Hydra, a setting given
twice refused).
"""
from __future__ import annotations

import sys
import typing
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from train.config import ConfigError, TrainConfig
from train.overrides import argv_for_hydra, not_in_schema, schema_child

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def unknown_settings(node, schema: type, prefix: str = "") -> list[str]:
    """The keys of `node` that `schema` (a config dataclass, recursively) does not have, each with the
    nearest names it does. Hydra's `+key=value` adds a key even to a structured config, and OmegaConf
    carries it into the dataclass unread: `+stage.stepz=5` trained the default steps without a word."""
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        if key not in hints:
            found.append(not_in_schema(str(key), schema, prefix))
            continue
        child, value = schema_child(schema, key), node[key]
        if child is not None and isinstance(value, DictConfig):
            found += unknown_settings(value, child, f"{prefix}{key}.")
    return found


def to_dataclass(cfg: DictConfig) -> TrainConfig:
    """The typed config (every interpolation resolved; missing mandatory values and settings the schema
    does not have are an error)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError("these settings have no value; set them on the command line (key=value): "
                          + ", ".join(missing))
    unknown = unknown_settings(cfg, TrainConfig)
    if unknown:
        raise ConfigError("no such setting: " + "; ".join(unknown) + " (train/config.py has them all)")
    return OmegaConf.to_object(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train_stage(cfg: DictConfig) -> None:
    from train.disk_space import DiskFull
    from train.distributed import StoppedByOtherRank, shutdown
    from train.run_lock import RunDirInUse
    from train.trainer import run

    try:
        typed = to_dataclass(cfg)
        code = run(typed, OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as err:
        print(f"config error: {err}", flush=True)
        shutdown(2)
    except RunDirInUse as err:
        print(f"run folder in use: {err}", flush=True)
        shutdown(2)
    except DiskFull as err:  # the run's status says failed; its last checkpoint is as it was
        print(f"disk full: {err.strerror}", flush=True)
        shutdown(1)
    except StoppedByOtherRank as err:  # that rank says why; its exit code
        shutdown(2 if err.kind in ("ConfigError", "RunDirInUse") else 1)
    shutdown(code)


def main() -> None:
    try:
        sys.argv[1:] = argv_for_hydra(sys.argv[1:])  # hydra.main reads sys.argv
    except ConfigError as err:
        print(f"config error: {err}", flush=True)
        sys.exit(2)
    train_stage()


if __name__ == "__main__":
    main()
