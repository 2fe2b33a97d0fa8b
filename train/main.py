"""`python -m train [hydra overrides]`: compose the config, validate it, train one stage.

    python -m train stage=v1-1_256 cluster=reference_32x8 backend=fsdp stage.data.shards='/data/{00000..09999}.tar'
    python -m train --cfg job            # print the composed config

The overrides pass through `train.overrides` first (brace patterns quoted for Hydra, a setting given
twice refused).
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from train.config import ConfigError, TrainConfig
from train.overrides import argv_for_hydra

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def unknown_settings(node, schema: type, prefix: str = "") -> list[str]:
    """The keys of `node` that `schema` (a config dataclass, recursively) does not have, each with the
    nearest names it does. Hydra's `+key=value` adds a key even to a structured config, and OmegaConf
    carries it into the dataclass unread: `+stage.stepz=5` trained the default steps without a word."""
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), n=2, cutoff=0.5)
            found.append(name + (f" (did you mean {' or '.join(prefix + n for n in near)}?)" if near else
                                 f" ({prefix.rstrip('.') or 'the top level'} has {', '.join(hints)})"))
            continue
        child = hints[key]
        child = next((a for a in typing.get_args(child) if dataclasses.is_dataclass(a)), child)  # Optional[X]
        value = node[key] if OmegaConf.is_config(node) else None
        if dataclasses.is_dataclass(child) and isinstance(value, DictConfig):
            found += unknown_settings(value, child, f"{name}.")
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
    from train.distributed import shutdown
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
