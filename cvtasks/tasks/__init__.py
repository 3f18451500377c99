"""Task lookup by name. Adding a task = one module here + one entry below + ``pipelines/configs/<name>.yaml``."""

from __future__ import annotations

import importlib

from cvtasks.tasks.base import Task

#: name -> "module:Class"; imported lazily so one task's heavy imports never slow another.
TASKS: dict[str, str] = {
    "cifar10": "cvtasks.tasks.cifar10:Cifar10Task",
    "hotdog": "cvtasks.tasks.hotdog:HotdogTask",
    "banana": "cvtasks.tasks.banana:BananaTask",
    "voc": "cvtasks.tasks.voc:VocTask",
}


def get_task(name: str) -> Task:
    """A fresh instance of task ``name``; unknown names fail with the list of known ones."""
    try:
        module_name, class_name = TASKS[name].split(":")
    except KeyError:
        raise ValueError(f'Unknown task "{name}"; known tasks: {", ".join(sorted(TASKS))}') from None
    return getattr(importlib.import_module(module_name), class_name)()
