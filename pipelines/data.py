"""Ray Data pipelines: dataset index -> parallel decode (cached when it fits) -> fresh augmentation every epoch.

    task.index(root, split)               driver: one row per sample, nothing decoded
    map_batches(task.decode)              decode in parallel Ray tasks; materialised once in the object store when
                                          the decoded split fits comfortably ("decode once"), else re-decoded while
                                          streaming with bounded memory
    map_batches(task.augment)             fresh random augmentation on every pass (every epoch)

Ray Train then splits the result across workers, which read their shard with ``iter_torch_batches``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data

from cvtasks.tasks.base import Batch, Config, Task

log = logging.getLogger(__name__)

#: Decoded column that marks rows to drop (bad files skipped with ``data.skip_bad``, images too small to crop).
KEEP_COLUMN = "keep"
#: Cache a decoded split in memory only when it needs at most this share of the object store.
CACHE_SHARE_OF_OBJECT_STORE = 0.3
#: Rows decoded on the driver to estimate the decoded size of a split.
SIZE_PROBE_ROWS = 8
DECODE_BATCH = 64
AUGMENT_BATCH = 256


@dataclass
class SplitData:
    """One split's pipeline plus what the run should know about it."""

    dataset: ray.data.Dataset
    rows: int
    cached: bool
    skipped: int | None  # rows dropped by the task's ``keep`` column; None when unknown (streaming)


def _decode(batch: Batch, task: Task, cfg: Config) -> Batch:
    return task.decode(batch, cfg)


def _augment(batch: Batch, task: Task, cfg: Config, train: bool) -> Batch:
    # A new unseeded generator on every call: each epoch re-executes this map, so augmentation is fresh each epoch.
    out = task.augment(batch, train, cfg, np.random.default_rng())
    return {key: out[key] for key in task.tensor_keys}


def _drop_unkept(batch: Batch) -> Batch:
    if KEEP_COLUMN not in batch:
        return batch
    keep = batch.pop(KEEP_COLUMN).astype(bool)
    return {key: value[keep] for key, value in batch.items()}


def decoded_bytes_estimate(task: Task, cfg: Config, index: pd.DataFrame) -> int:
    """Decoded size of the whole split, extrapolated from decoding a few rows on the driver."""
    probe = index.head(SIZE_PROBE_ROWS)
    batch = {col: probe[col].to_numpy() for col in probe.columns}
    decoded = task.decode(batch, cfg)
    per_row = sum(_nbytes(v) for v in decoded.values()) / max(len(probe), 1)
    return int(per_row * len(index))


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return sum(_nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 64))


def should_cache(mode: str, estimate: int, object_store_bytes: float) -> bool:
    if mode == "memory":
        return True
    if mode == "stream":
        return False
    if mode == "auto":
        return estimate <= CACHE_SHARE_OF_OBJECT_STORE * object_store_bytes
    raise ValueError(f'Unknown data.cache mode "{mode}": use auto, memory or stream')


def build_split(task: Task, cfg: Config, split: str, train: bool) -> SplitData:
    """The Ray Data pipeline of one split: decoded (cached or streaming), then augmented."""
    index = task.index(cfg["data"]["root"], split, cfg)
    if index.empty:
        raise ValueError(f"{task.name}: split {split!r} under {cfg['data']['root']} has no samples")
    blocks = max(1, min(len(index) // DECODE_BATCH, 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))))
    bounds = np.linspace(0, len(index), blocks + 1).astype(int)
    chunks = [index.iloc[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
    ds = ray.data.from_pandas(chunks).map_batches(
        _decode, fn_kwargs={"task": task, "cfg": cfg}, batch_format="numpy", batch_size=DECODE_BATCH
    )
    estimate = decoded_bytes_estimate(task, cfg, index)
    store = ray.available_resources().get("object_store_memory", 0.0)
    cached = should_cache(cfg["data"]["cache"], estimate, store)
    log.info(
        "%s/%s: %d samples, ~%.1f MB decoded -> %s",
        task.name, split, len(index), estimate / 1e6, "cached in object store" if cached else "streamed",
    )
    skipped: int | None = None
    if cached:
        ds = ds.materialize()
        if KEEP_COLUMN in ds.columns():
            kept = int(ds.sum(KEEP_COLUMN))
            skipped = ds.count() - kept
            ds = ds.map_batches(_drop_unkept, batch_format="numpy").materialize()
        else:
            skipped = 0
        if skipped:
            log.warning("%s/%s: skipped %d of %d samples (see the task's log for why)", task.name, split, skipped,
                        len(index))
    else:
        ds = ds.map_batches(_drop_unkept, batch_format="numpy")
    ds = ds.map_batches(
        _augment,
        fn_kwargs={"task": task, "cfg": cfg, "train": train},
        batch_format="numpy",
        batch_size=AUGMENT_BATCH,
    )
    return SplitData(dataset=ds, rows=len(index) - (skipped or 0), cached=cached, skipped=skipped)
