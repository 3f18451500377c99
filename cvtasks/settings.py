"""Typed task configs: a dataclass per config section, built once from the checked YAML + overrides.

The shared sections (``data``, ``train``, ``scaling``, ``optim``) are defined here; a task declares the sections it
owns or extends on its class (``Workload.sections``: name -> :class:`Section` subclass), e.g. banana's ``detect`` and
its ``data`` with ``classes``. :class:`TaskConfig` holds the validated dict (what Tune substitutes dotted paths in,
what MLflow logs and what Ray ships) and builds the typed sections from it on first use, so a process that only
passes a config along (Ray Data's coordinators) never imports the task's module.

No torch import here: pipelines' light modules import it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar, Union

S = TypeVar("S", bound="Section")


class SettingsError(ValueError):
    """A config section does not match its declared fields (a key too many or missing, a value of the wrong type)."""


@dataclass(frozen=True)
class Section:
    """A config section: fields named like the YAML keys. Subclasses add a task's own keys."""

    @classmethod
    def build(cls: type[S], values: dict[str, Any], path: str) -> S:
        """The section from its YAML mapping, checking that keys and fields match and each value's type."""
        if not isinstance(values, dict):
            raise SettingsError(f"{path} must be a mapping, got {values!r}")
        hints = _hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        missing = [n for n in names if n not in values and _no_default(cls, n)]
        if unknown or missing:
            raise SettingsError(f"{path}: {cls.__name__} has no field(s) {unknown} / lacks {missing} (the task's "
                                "YAML and its declared sections must agree)")
        return cls(**{name: _typed(values[name], hints[name], f"{path}.{name}") for name in names if name in values})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _no_default(cls: type, name: str) -> bool:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _typed(value: Any, hint: Any, path: str) -> Any:
    """``value`` as type ``hint``: an int may stand for a float, a mapping becomes its Section, lists stay lists."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _typed(value, option, path)
            except SettingsError as exc:
                errors.append(str(exc))
        raise SettingsError(errors[0])
    if isinstance(hint, type) and issubclass(hint, Section):
        return hint.build(value, path)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or hint
    if expected is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, expected) or (expected in (int, float) and isinstance(value, bool)):
        raise SettingsError(f"{path} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    if expected is list:
        (item,) = typing.get_args(hint) or (Any,)
        return [_typed(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if expected is dict:
        _, item = typing.get_args(hint) or (str, Any)
        return {k: _typed(v, item, f"{path}.{k}") for k, v in value.items()}
    return value


@dataclass(frozen=True)
class DataSection(Section):
    root: str  # folder holding the dataset's own top folder; a local path or storage URI
    batch_size: int  # per worker
    eval_batch_size: int  # per worker
    cache: str  # auto | memory | stream
    augment_on: str  # auto | worker | pipeline: where training batches are augmented (pipelines.data)
    skip_bad: bool  # skip (count and log) unreadable samples instead of failing on the first


@dataclass(frozen=True)
class TrainSection(Section):
    epochs: int
    seed: int
    amp: bool  # bfloat16 autocast on GPU
    channels_last: bool  # model weights and image batches in NHWC memory format (pipelines.steps.channels_last_model)
    max_failures: int  # Ray Train restarts from the last checkpoint after this many worker failures
    inject_failure_at_epoch: int  # testing aid: raise once after this epoch's checkpoint


@dataclass(frozen=True)
class ScalingSection(Section):
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    torch_threads: int  # 0: one per reserved CPU
    worker_resources: dict[str, float]  # custom Ray resources per worker


@dataclass(frozen=True)
class OptimSection(Section):
    name: str  # adam | sgd
    lr: float
    schedule: str  # constant | cosine
    momentum: float
    weight_decay: float


SHARED: dict[str, type[Section]] = {"data": DataSection, "train": TrainSection, "scaling": ScalingSection,
                                    "optim": OptimSection}
#: Top-level keys that are not sections.
PLAIN_KEYS = ("task", "search")


class TaskConfig:
    """A task's config: typed sections as attributes (``cfg.data.root``, ``cfg.optim.lr``; a task's own sections
    by their names, ``cfg.detect``), the validated dict as ``raw``.

    ``task_path`` ("module:Class") names the task's class, so that a process that did not register the task (a Ray
    worker of a task registered at test time) still finds its sections.
    """

    def __init__(self, raw: dict[str, Any], task_path: str) -> None:
        self.raw = raw
        self.task_path = task_path

    @property
    def task(self) -> str:
        return str(self.raw["task"])

    @functools.cached_property
    def _sections(self) -> dict[str, Section]:
        module, name = self.task_path.split(":")
        declared = {**SHARED, **getattr(importlib.import_module(module), name).sections}
        unknown = sorted(set(self.raw) - set(declared) - set(PLAIN_KEYS))
        if unknown:
            raise SettingsError(f"the {self.task} config has section(s) {unknown} its task does not declare")
        return {key: section.build(self.raw[key], key) for key, section in declared.items() if key in self.raw}

    def validate(self) -> TaskConfig:
        """Build every section now (on the driver), so that a mismatch fails before anything starts."""
        self._sections  # noqa: B018
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("raw", "task_path"):
            raise AttributeError(name)
        try:
            return self._sections[name]
        except KeyError:
            raise AttributeError(f"the {self.task} config has no section {name!r}") from None

    # Typed views of the shared sections (a task's subclass where it extends one).
    data: DataSection
    train: TrainSection
    scaling: ScalingSection
    optim: OptimSection

    def with_values(self, values: dict[str, Any]) -> TaskConfig:
        """A copy with ``{"data.class_names": [...]}``-style dotted paths set (what the driver resolves for
        workers); the sections are checked again when used."""
        raw = copy.deepcopy(self.raw)
        for path, value in values.items():
            *parents, leaf = path.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return TaskConfig(raw, self.task_path)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any], str]]:
        return TaskConfig, (self.raw, self.task_path)  # the sections are rebuilt where they are used

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskConfig) and (self.raw, self.task_path) == (other.raw, other.task_path)

    def __repr__(self) -> str:
        return f"TaskConfig({self.task!r})"
