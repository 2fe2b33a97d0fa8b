"""`python -m train [hydra overrides]`: compose the config, validate it, train one stage.

    python -m train stage=v1-1_256 cluster=reference_32x8 backend=fsdp stage.data.shards=/data/{00000..09999}.tar
    python -m train --cfg job            # print the composed config
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from train.config import ConfigError, TrainConfig

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
def main(cfg: DictConfig) -> None:
    from train.distributed import shutdown
    from train.trainer import run

    try:
        typed = to_dataclass(cfg)
        code = run(typed, OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as err:
        print(f"config error: {err}", flush=True)
        shutdown(2)
    shutdown(code)


if __name__ == "__main__":
    main()
