"""Hydra's runtime config, typed as what it is at run time."""

from __future__ import annotations

from typing import cast

from omegaconf import DictConfig


def hydra_node() -> DictConfig:
    """``HydraConfig.get()`` (raises ValueError outside a Hydra app).

    Hydra annotates it as its ``HydraConf`` dataclass, but at run time it is the ``hydra``
    DictConfig node, which is what ``OmegaConf.select``, ``open_dict`` and ``read_write`` take.
    """
    from hydra.core.hydra_config import HydraConfig  # Hydra is imported only where it runs

    return cast(DictConfig, HydraConfig.get())
