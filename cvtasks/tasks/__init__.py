"""The task registry: name -> "module:Class". A task declares everything about itself on its class (dataset, demo
data, download, demo steps, runner, config file; see :mod:`cvtasks.catalog`). Adding one is its module plus either an
entry in ``TASKS``, an entry point of group ``raycv.tasks`` in the package that holds it (found in every process of
every node where that package is installed), or :func:`register_task` (this process only, as the tests do: Ray's
processes get the task by import path)."""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

from cvtasks.catalog import Dataset, Workload

#: name -> "module:Class"; imported lazily so one task's heavy imports never slow another.
TASKS: dict[str, str] = {
    "cifar10": "cvtasks.tasks.cifar10:Cifar10Task",
    "hotdog": "cvtasks.tasks.hotdog:HotdogTask",
    "banana": "cvtasks.tasks.banana:BananaTask",
    "voc": "cvtasks.tasks.voc:VocTask",
    "style": "cvtasks.tasks.style:StyleTask",
}


ENTRY_POINT_GROUP = "raycv.tasks"


@functools.cache
def _installed() -> None:
    """Add the tasks that installed packages declare as entry points (once per process)."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        TASKS.setdefault(entry.name, entry.value)


def register_task(name: str, path: str) -> None:
    """Add task ``name`` implemented by ``path`` ("module:Class", importable wherever it runs)."""
    TASKS[name] = path


def task_names() -> list[str]:
    """Registered task names, in registration order (the order of the demo and of the CLI's choices)."""
    _installed()
    return list(TASKS)


def task_class(name: str) -> type[Workload]:
    """The class registered as ``name``; unknown names fail with the list of known ones."""
    _installed()
    try:
        module_name, class_name = TASKS[name].split(":")
    except KeyError:
        raise ValueError(f'Unknown task "{name}"; known tasks: {", ".join(task_names())}') from None
    return getattr(importlib.import_module(module_name), class_name)


def get_task(name: str) -> Workload:
    """A fresh instance of task ``name``."""
    return task_class(name)()


def all_datasets() -> list[tuple[str, Dataset]]:
    """(task name, dataset) for every dataset every registered task declares, in registry order."""
    return [(name, dataset) for name in task_names() for dataset in task_class(name).datasets]


def dataset_named(name: str) -> Dataset:
    """The declared dataset called ``name`` or one of its aliases."""
    for _, dataset in all_datasets():
        if name == dataset.name or name in dataset.aliases:
            return dataset
    known = ", ".join(d.name for _, d in all_datasets())
    raise ValueError(f"unknown dataset {name!r}; known: {known}")
