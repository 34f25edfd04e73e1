"""The Hydra app behind `python -m harness` (see `harness.__main__` for the checks that run before it)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness.config import CONF_DIR
from harness.run import run
from methods.base import ConfigError


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as error:
        print(f"prunebench: error: {error}", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(2)  # in a sweep, one bad job is reported and the others still run
