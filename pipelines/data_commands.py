"""``raycv data``: write the demo datasets, download the real ones, and check a dataset before training."""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from cvtasks import storage
from cvtasks.catalog import Dataset
from cvtasks.errors import DataFormatError
from cvtasks.settings import TaskConfig
from cvtasks.tasks import all_datasets, get_task
from pipelines import logs

log = logging.getLogger(__name__)

DEMO_MARKER = ".raycv-demo"
#: Beside each demo folder while it is (re)written: ``.<folder>.staging`` holds the new copy, ``.<folder>.old`` the
#: replaced one until the new copy is in place.
STAGING_SUFFIX = ".staging"
OLD_SUFFIX = ".old"


def demo_datasets() -> dict[str, Dataset]:
    """Every demo dataset the registered tasks declare, by name, the costliest to write first (written in
    parallel, they then end at about the same time)."""
    declared = [dataset for _, dataset in all_datasets() if dataset.demo_writer]
    return {d.name: d for d in sorted(declared, key=lambda d: -d.demo_cost)}


def _chosen(only: list[str] | None) -> dict[str, Dataset]:
    """The demo datasets named in ``only`` (all when None), refusing unknown names."""
    known = demo_datasets()
    unknown = sorted(set(only or []) - set(known))
    if unknown:
        raise ValueError(f"unknown demo dataset(s) {unknown}; known: {', '.join(known)}")
    return {name: d for name, d in known.items() if not only or name in only}


def make_demo(root: str | Path, seed: int = 0, only: list[str] | None = None,
              processes: int | None = None) -> dict[str, Path]:
    """Write each demo dataset under ``root`` unless an earlier run already finished writing it.

    Missing datasets are written in parallel, one process per CPU (``processes`` caps it): the writers encode
    thousands of PNGs and JPEGs, which takes one core half a minute.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    chosen = _chosen(only)
    missing = []
    for name, dataset in chosen.items():
        folder = root / dataset.folder
        marker = folder / DEMO_MARKER
        if marker.exists() and marker.read_text().strip() == str(seed):
            log.info("demo %s: already at %s (seed %d), reusing it", name, folder, seed)
        else:
            log.info("demo %s: writing %s ...", name, folder)
            missing.append(dataset)
    workers = min(len(missing), processes or os.cpu_count() or 1)
    if workers == 1:
        for dataset in missing:
            _write_demo(dataset, root, seed)
    elif workers > 1:
        # spawn, not fork: the calling process may already run Ray's threads.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=logs.configure, initargs=(logging.getLogger().level,)) as pool:
            for future in [pool.submit(_write_demo, dataset, root, seed) for dataset in missing]:
                future.result()
    return {name: root / dataset.folder for name, dataset in chosen.items()}


def _write_demo(dataset: Dataset, root: Path, seed: int) -> None:
    """Run ``dataset``'s demo writer into a staging folder, mark it complete for ``seed``, then swap it in.

    The folder under ``root`` is only ever a finished copy (with its marker) or absent: a writer that crashes
    leaves its staging folder, which the next run removes, never a mix of two seeds under a trusted marker.
    """
    writer, folder = str(dataset.demo_writer), dataset.folder
    staging, old = root / f".{folder}{STAGING_SUFFIX}", root / f".{folder}{OLD_SUFFIX}"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    module_name, function = writer.split(":")
    getattr(importlib.import_module(module_name), function)(staging, seed=seed)
    (staging / folder / DEMO_MARKER).write_text(str(seed))
    _swap_in(staging / folder, root / folder, old)
    staging.rmdir()


def _swap_in(new: Path, target: Path, old: Path) -> None:
    """Move complete folder ``new`` to ``target`` by renames, parking a previous ``target`` at ``old`` first."""
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def make_demo_at(root: str, seed: int = 0, only: list[str] | None = None) -> str:
    """:func:`make_demo` for a local folder or a storage URI (``s3://bucket/datasets``); returns ``root``.

    For a URI, the datasets it lacks (no marker for ``seed``) are written to a local staging folder and uploaded,
    each folder's marker last, so an interrupted upload is redone by the next call.
    """
    if not storage.is_uri(root):
        make_demo(root, seed=seed, only=only)
        return root
    chosen = _chosen(only)
    missing = [name for name, d in chosen.items() if not _remote_marker_is(root, d.folder, DEMO_MARKER, str(seed))]
    for name in sorted(set(chosen) - set(missing)):
        log.info("demo %s: already at %s (seed %d), reusing it", name, storage.join(root, chosen[name].folder), seed)
    if missing:
        with tempfile.TemporaryDirectory(prefix="raycv-demo-") as staging:
            make_demo(staging, seed=seed, only=missing)
            for name in missing:
                folder = chosen[name].folder
                count = storage.upload_tree(Path(staging) / folder, storage.join(root, folder), last=DEMO_MARKER)
                log.info("demo %s: uploaded %d files to %s", name, count, storage.join(root, folder))
    return root


def _remote_marker_is(root: str, folder: str, marker: str, expected: str) -> bool:
    path = storage.join(root, folder, marker)
    return storage.exists(path) and storage.read_bytes(path).decode().strip() == expected


def download(name: str, root: str | Path) -> str:
    """Make dataset ``name`` ready under ``root``: a local folder, or a storage URI it is uploaded to.

    For a URI the archive is fetched and unpacked in the local download cache (``$RAYCV_CACHE``, default
    ``~/.cache/raycv``; an interrupted download resumes there), then uploaded with the completion marker last.
    """
    from pipelines.download import MARKER, source_named
    from pipelines.download import download as fetch

    if not storage.is_uri(root):
        return str(fetch(name, root, progress=_log_progress))
    name, source = source_named(name)
    if _remote_marker_is(str(root), source.top, MARKER, source.digest):
        log.info("%s: already at %s", name, storage.join(str(root), source.folder))
        return storage.join(str(root), source.folder)
    local_root = download_cache() / name
    fetch(name, local_root, progress=_log_progress)
    count = storage.upload_tree(local_root / source.top, storage.join(str(root), source.top), last=MARKER)
    log.info("%s: uploaded %d files to %s", name, count, storage.join(str(root), source.top))
    return storage.join(str(root), source.folder)


def download_cache() -> Path:
    """Local folder where archives for storage URIs are fetched and unpacked before upload."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raycv"
    return Path(os.environ.get("RAYCV_CACHE") or default)


def _log_progress(done: int, total: int | None) -> None:
    if total:
        log.info("downloaded %.1f / %.1f MB (%.0f%%)", done / 1e6, total / 1e6, 100 * done / total)
    else:
        log.info("downloaded %.1f MB", done / 1e6)


def find_bad_rows(cfg: TaskConfig, index: pd.DataFrame, batch_size: int = 64) -> list[str]:
    """Decode every row of ``cfg``'s task; return one message per bad sample (the error naming its file)."""
    task = get_task(cfg.task)
    problems = []
    for start in range(0, len(index), batch_size):
        chunk = index.iloc[start : start + batch_size]
        try:
            task.decode({c: chunk[c].to_numpy() for c in chunk.columns}, cfg)
        except DataFormatError:
            for i in range(len(chunk)):
                row = chunk.iloc[i : i + 1]
                try:
                    task.decode({c: row[c].to_numpy() for c in row.columns}, cfg)
                except DataFormatError as exc:
                    problems.append(str(exc))
    return problems


def check(cfg: TaskConfig) -> int:
    """Print samples per split (and per class where the index has a scalar ``label``) and every bad file."""
    task = get_task(cfg.task)
    if not task.datasets:
        raise ValueError(f"{cfg.task} reads no dataset: nothing to check")
    bad_total = 0
    for split in ("train", "val"):
        try:
            index = task.index(split, cfg)
        except DataFormatError as exc:
            print(f"{split}: ERROR {exc}")
            bad_total += 1
            continue
        line = f"{split}: {len(index)} samples"
        if "label" in index.columns and np.issubdtype(index["label"].dtype, np.number):
            counts = Counter(index["label"].tolist())
            line += " | per class: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        print(line)
        skipped = index.attrs.get("skipped")
        if skipped:
            print(f"  index skipped rows: {skipped}")
        problems = find_bad_rows(cfg, index)
        for problem in problems:
            print(f"  BAD {problem}")
        bad_total += len(problems)
    print("ok" if bad_total == 0 else f"{bad_total} problem(s) found")
    return 0 if bad_total == 0 else 1
