"""Typed task configs for tests that set a few values by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvtasks.settings import TaskConfig
from pipelines.config import flatten, load_config


def typed_config(task: str, partial: dict[str, Any] | None = None, root: str | Path | None = None) -> TaskConfig:
    """Task ``task``'s config with the values of the nested dict ``partial`` (and ``data.root``) set over it."""
    values = flatten(partial or {})
    if root is not None:
        values["data.root"] = str(root)
    return load_config(task).with_values(values)


def at_root(cfg: TaskConfig, root: str | Path) -> TaskConfig:
    """``cfg`` reading the dataset under ``root``."""
    return cfg.with_values({"data.root": str(root)})
