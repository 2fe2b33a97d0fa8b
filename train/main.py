"""`python -m train [hydra overrides]`: compose the config, validate it, train one stage.

    python -m train stage=v1-1_256 cluster=reference_32x8 backend=fsdp stage.data.shards='/data/{00000..09999}.tar'
    python -m train --cfg job            # print the composed config

The overrides pass through `train.overrides` first (brace patterns quoted for Hydra, a setting given
twice refused).
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from train.config import ConfigError, TrainConfig
from train.overrides import argv_for_hydra

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_dataclass(cfg: DictConfig) -> TrainConfig:
    """The typed config (every interpolation resolved; missing mandatory values are an error)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError("these settings have no value; set them on the command line (key=value): "
                          + ", ".join(missing))
    return OmegaConf.to_object(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train_stage(cfg: DictConfig) -> None:
    from train.distributed import shutdown
    from train.trainer import run

    try:
        typed = to_dataclass(cfg)
        code = run(typed, OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as err:
        print(f"config error: {err}", flush=True)
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
