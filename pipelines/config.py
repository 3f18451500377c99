"""Task configs: ``configs/defaults.yaml`` under the task's YAML (``configs/<task>.yaml``), plus checked
``key.path=value`` overrides, built into the task's typed config (:class:`cvtasks.settings.TaskConfig`).

The checks here work on the nested dict (``TaskConfig.raw``), which is also what Tune substitutes sampled values
into and what MLflow records.
Overrides may only name keys the defaults have (a typo fails with the closest valid keys), and a value must keep
the default's type (an int may stand for a float).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from cvtasks.settings import SettingsError, TaskConfig
from cvtasks.tasks import TASKS, task_class, task_names

CONFIG_DIR = Path(__file__).parent / "configs"
#: Keys whose values are free-form (their defaults may be empty or of another type).
FREE_FORM = ("search",)


class ConfigError(ValueError):
    """A config file or override is invalid."""


DEFAULTS_FILE = CONFIG_DIR / "defaults.yaml"


def task_config_file(task: str) -> Path:
    """The YAML file of registered task ``task``: the one it declares, else ``configs/<task>.yaml``."""
    if task not in task_names():
        raise ConfigError(f"unknown task {task!r}; available: {', '.join(task_names())}")
    return task_class(task).config_file or CONFIG_DIR / f"{task}.yaml"


def load_config(task: str, config_file: str | Path | None = None, overrides: list[str] | None = None) -> TaskConfig:
    """The resolved, typed config of ``task``: defaults, then ``config_file`` (a partial YAML), then ``overrides``,
    each checked against the keys and types of the defaults, then built into the task's typed sections."""
    cfg = _deep_update(_read_yaml(DEFAULTS_FILE), _read_yaml(task_config_file(task)))
    if config_file is not None:
        merge(cfg, _read_yaml(Path(config_file)), source=str(config_file))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        set_path(cfg, key.strip(), yaml.safe_load(raw))
    return typed(task, cfg)


def typed(task: str, raw: dict) -> TaskConfig:
    """``raw`` (a checked config dict of registered task ``task``) as its typed config."""
    try:
        return TaskConfig(raw, TASKS[task]).validate()
    except SettingsError as exc:
        raise ConfigError(f"{task} config: {exc}") from exc


def _deep_update(base: dict, update: dict) -> dict:
    """``base`` with ``update`` laid over it; unlike ``merge`` it may add keys (a task's own sections)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at top level")
    return data


def merge(cfg: dict, partial: dict, source: str, prefix: str = "") -> None:
    """Merge ``partial`` into ``cfg`` in place, each leaf checked like an override."""
    for key, value in partial.items():
        path = f"{prefix}{key}"
        # A section merges key by key; an empty default mapping (scaling.worker_resources) takes the value whole.
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and cfg[key] and key not in FREE_FORM:
            merge(cfg[key], value, source, prefix=f"{path}.")
        else:
            try:
                set_path(cfg, key, value, full_path=path)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from exc


def file_sets(config_file: str | Path, path: str) -> bool:
    """Whether the partial YAML ``config_file`` gives a value for dotted ``path`` (e.g. ``train.amp``)."""
    try:
        get_path(_read_yaml(Path(config_file)), path)
    except (KeyError, TypeError):
        return False
    return True


def get_path(cfg: dict, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = node[part]
    return node


def set_path(cfg: dict, path: str, value: Any, full_path: str | None = None) -> None:
    """Set ``cfg[a][b][c] = value`` for ``path`` "a.b.c", refusing unknown keys and changed types."""
    full_path = full_path or path
    parts = path.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part in FREE_FORM and i == 0:
            node = node.setdefault(part, {})
            continue
        if not isinstance(node.get(part), dict):
            raise ConfigError(_unknown(full_path, node, part))
        node = node[part]
    leaf = parts[-1]
    if parts[0] in FREE_FORM:
        node[leaf] = value
        return
    if leaf not in node:
        raise ConfigError(_unknown(full_path, node, leaf))
    node[leaf] = _coerce(full_path, node[leaf], value)


def _unknown(full_path: str, node: dict, part: str) -> str:
    close = difflib.get_close_matches(part, list(node), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys here: {', '.join(sorted(node))}"
    return f"unknown config key {full_path!r}{hint}"


def _coerce(path: str, default: Any, value: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be a boolean, got {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, float) and isinstance(value, str):
        # YAML 1.1 reads "1e4" (no dot) as a string; it is how people write loss weights.
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, type(default)):
        raise ConfigError(f"{path} must be {type(default).__name__} like its default {default!r}, got {value!r}")
    return copy.deepcopy(value)


#: Lowest allowed value of numeric keys (checked where a config has them: style transfer has no workers or epochs).
AT_LEAST = {
    "scaling.workers": 1, "scaling.gpus_per_worker": 0, "scaling.torch_threads": 0, "train.epochs": 1,
    "train.max_failures": -1, "data.batch_size": 1, "data.eval_batch_size": 1, "optim.momentum": 0,
    "optim.weight_decay": 0,
}
#: Numeric keys whose value must be above this bound.
ABOVE = {"scaling.cpus_per_worker": 0, "optim.lr": 0}


def check_values(cfg: TaskConfig) -> None:
    """Refuse values no run can use (0 workers, 0 epochs, a negative learning rate), naming key and fix."""
    for path, low in AT_LEAST.items():
        value = _number_at(cfg, path)
        if value is not None and value < low:
            raise ConfigError(f"{path} must be at least {low}, got {value!r} (--set {path}=...)")
    for path, bound in ABOVE.items():
        value = _number_at(cfg, path)
        if value is not None and not value > bound:
            raise ConfigError(f"{path} must be above {bound}, got {value!r} (--set {path}=...)")


def _number_at(cfg: TaskConfig, path: str) -> float | None:
    try:
        value = get_path(cfg.raw, path)
    except (KeyError, TypeError):
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{path}."))
        else:
            flat[path] = value
    return flat
