"""Hydra composition of conf/ outside `pipelines.run` (whose @hydra.main composes for itself): for
`pipelines.submit`, the tests and the benchmarks, one way.

    compose_config(["+experiment=tiny", "model.num_layers=3"]) -> Config
    compose_dict(overrides) -> (composed DictConfig without Hydra's own section, Hydra's group choices)
"""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from conf.schema import Config, register_configs

CONF_DIR = Path(__file__).resolve().parent


def compose_dict(overrides: list[str] = (), config_dir: Path = CONF_DIR) -> tuple[DictConfig, dict]:
    """The composed config as `pipelines.run` gets it, and the option chosen per config group (what
    pipelines/validate.py: check_composed reads)."""
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        composed = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(composed.hydra.runtime.choices)
    with open_dict(composed):
        del composed["hydra"]
    return composed, choices


def compose_config(overrides: list[str] = (), config_dir: Path = CONF_DIR) -> Config:
    """The typed config of these overrides (not validated)."""
    return OmegaConf.to_object(compose_dict(overrides, config_dir)[0])
