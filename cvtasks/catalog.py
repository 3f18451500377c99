"""What a task declares about itself besides its model: its datasets, where they download from, its demo runs.

These are plain data (no torch import), read by the generic commands: ``raycv data make-demo`` writes every declared
demo dataset, ``raycv data download NAME`` fetches a declared source, ``raycv demo`` runs every declared demo step,
and the CLI's task choices come from the registry (:mod:`cvtasks.tasks`). A new task declares these on its class and
touches nothing in ``pipelines/``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cvtasks.settings import Section

#: d2l's data hub (``d2l.DATA_URL``), where the book's datasets are downloaded from.
D2L_DATA_URL = "http://d2l-data.s3-accelerate.amazonaws.com/"


@dataclass(frozen=True)
class Download:
    """Where a dataset's real archive comes from and where it unpacks to."""

    url: str
    algorithm: str  # a hashlib name: "sha1" (d2l's data hub) or "sha256"
    digest: str  # hex digest of the archive
    folder: str  # the dataset folder under the root, as the reader expects it; its first part is the archive's top

    @property
    def filename(self) -> str:
        return posixpath.basename(self.url)

    @property
    def top(self) -> str:
        return self.folder.split("/")[0]


@dataclass(frozen=True)
class Dataset:
    """A dataset a task reads: its top folder under ``data.root``, how to write its demo copy, how to download it.

    ``demo_writer`` is ``"module:function"`` taking ``(root, seed=)`` and writing ``root/<folder>``;
    ``demo_cost`` ranks how long it takes (the costliest writers start first when written in parallel, so that
    they end at about the same time).
    """

    name: str
    folder: str
    demo_writer: str | None = None
    demo_cost: int = 0
    download: Download | None = None
    aliases: tuple[str, ...] = ()


#: Demo override for a single worker computing on every core: it reserves one CPU (Ray Data keeps the other), but the
#: decoded data is cached, so Ray Data's augment tasks leave that CPU mostly idle. Measured: banana 79 -> 105
#: examples/sec; CIFAR 1.50x side by side in benchmarks/bench_train.py.
ALL_CORES = "scaling.torch_threads={cpus}"


@dataclass(frozen=True)
class DemoStep:
    """One run of ``raycv demo``: ``kind`` "train" (the task's runner) or "tune" (a sweep) with config overrides.

    ``overrides`` may name an earlier step's MLflow run as ``{run:<step name>}`` and the CPU count of the Ray
    cluster's largest node (where a single worker may run) as ``{cpus}``. The demo runs every task's train steps in
    registry order, then the sweeps.
    """

    name: str
    task: str
    overrides: tuple[str, ...] = ()
    kind: str = "train"
    sweep: dict[str, Any] = field(default_factory=dict)


class Workload:
    """The declaration every registered task makes; :class:`cvtasks.tasks.base.Task` adds the Ray Train interface.

    ``runner`` names how pipelines runs it: "train" (Ray Train over a dataset, the Task interface) or another
    runner pipelines knows (style transfer's "stylize": one optimised image per Ray task).
    """

    name: ClassVar[str]
    #: Headline metric (a key of the run's metrics), used to rank runs and sweeps; ``metric_mode`` "max" or "min".
    metric: ClassVar[str]
    metric_mode: ClassVar[str] = "max"
    runner: ClassVar[str] = "train"
    #: The task's YAML config; None: ``pipelines/configs/<name>.yaml``.
    config_file: ClassVar[Path | None] = None
    datasets: ClassVar[tuple[Dataset, ...]] = ()
    demo_steps: ClassVar[tuple[DemoStep, ...]] = ()
    #: The config sections the task owns or extends (name -> Section subclass); the shared ones
    #: (:data:`cvtasks.settings.SHARED`) apply where it declares none.
    sections: ClassVar[dict[str, type[Section]]] = {}
