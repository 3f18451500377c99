"""Ray Data pipelines: dataset index -> parallel decode (cached when it fits) -> fresh augmentation every epoch.

    task.index(split, cfg)                driver: one row per sample, nothing decoded
    map_batches(task.decode)              decode in parallel Ray tasks, dropping rows the task marks ``keep=False``;
                                          materialised once in the object store when, with what the store holds,
                                          it fits in 45% of it ("decode once"), else re-decoded while streaming
                                          with bounded memory (a streamed training split shuffles its index blocks
                                          before the decode, so no shuffle waits for, and holds, the decoded split)
    map_batches(task.augment_pixels)      fresh random augmentation on every pass (every epoch), in Ray tasks
                                          (``data.augment_on: pipeline``), or in each training worker's own
                                          process as it draws a batch (``worker``: ``pipelines.loop.augmented_batches``)
    task.inputs_from_pixels               in the training worker, on its device: the augmented pixels (uint8 where
                                          the augmentation kept them so) standardised into the model's float32 input

Ray Train then splits the result across workers, which read their shard with ``iter_torch_batches`` (or, where
they augment, ``iter_batches`` of the decoded arrays).

Why pixels cross the object store, not model inputs: float32 inputs are 4x the bytes of uint8 pixels, and every
byte an augment task writes is copied again by the reader's shuffle buffer and its torch conversion (and, on GPUs,
to the device). Augmenting CIFAR-10's cached 50,000 images in Ray Data's tasks took 1.67 s an epoch shipping float32
inputs and 0.82 s shipping uint8 pixels standardised by the reader (4 alternating rounds, 2 CPUs).

Where augmentation runs (``data.augment_on``, :func:`augments_in_worker`): ``auto`` picks the worker when training
computes on CPUs and the pipeline when it has GPUs. On CPUs the workers' torch threads already occupy the cores, and
augment tasks beside them only compete for those cores, copy augmented crops through the object store and, in epoch 1,
start processes that import torch (benchmarks/bench_train.py measures both places side by side). A GPU worker's
CPU is free while the GPU computes, and augmenting there would stall the GPU: the pipeline augments on other CPUs.

Throughput (benchmarks/bench_data.py): each epoch re-runs only the augment map over the cached blocks, so the per-epoch
cost is dominated by Ray's per-task and per-execution overhead on small in-memory datasets. The split is therefore cut
into few blocks (``BLOCKS_PER_CPU`` per Ray CPU), and skipped rows are counted from the cached blocks' metadata rather
than by an aggregation and a second materialised copy. A streamed split keeps no blocks to count, so under
``data.skip_bad`` (whose skips are always reported) it is decoded once more, streaming, just to count what is kept.
An index that carries the data itself (CIFAR's raw bytes) is cut into more blocks where needed so that none exceeds
the block size (:func:`source_blocks`): ``from_pandas`` puts the whole index in the object store.

At real scale (``benchmarks/bench_data.py --scale full``: 50,000 CIFAR images, 2,913 VOC-size JPEG + PNG pairs, 2
CPUs), with uint8 pixels crossing over (both sides: the DataLoaders' workers also return pixels, which the consumer
standardises), augmenting in the pipeline's tasks reads CIFAR 1.12x as fast as a batched torch DataLoader (0.66 s
vs 0.74 s an epoch) and VOC, whose 2.2 GB decoded split the cache rule keeps (43% of a 5.25 GB store), 1.56x (5.0 s
vs 7.8 s); what CPU training runs (augment in the loop) reads CIFAR 1.48x as fast. Shipping float32 inputs, the
pipeline's CIFAR epoch took 1.43-2.07 s (0.46-0.61x) and VOC's 8.0 s. Streamed (the rule before cached at most 30%
of the free store), a VOC epoch decodes again and took 12.7-13.9 s. Ray Data's per-operator reservation, which on
2 CPUs mostly admits one map task at a time, is kept: without it the ingest benchmark was faster, but a small store
spilled more and training that augments in Ray Data's tasks ran 0.7x as fast. The benchmark's docstring has the
tables and the measurements behind these reasons.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.data

if TYPE_CHECKING:  # importing cvtasks imports torch: see task_path
    import pandas as pd

    from cvtasks.tasks.base import Batch, Config, Task

log = logging.getLogger(__name__)

#: Decoded column that marks rows to drop (bad files skipped with ``data.skip_bad``, images too small to crop).
KEEP_COLUMN = "keep"
#: A decoded split is cached in the object store only while everything in the store, the split included, stays
#: within this share of it: Ray Data's streaming executor budgets half of the store for the pipeline it runs (its
#: default memory limit fraction, with the per-operator reservation kept), and 5% stays spare (index blocks, the
#: consumer's batches). What the store holds already counts: a run's training split, cached first, other jobs'
#: objects. VOC's 2.2 GB decoded training split cached on a 5.25 GB store (43%): peak 66% of the store, nothing
#: spilled (benchmarks/bench_voc_memory.py --object-store-mb 5250); an epoch augmenting in Ray Data's tasks 7.5 s
#: against 13.0 s streamed (7 GB store; the rule before, 30% of the free store, streamed it).
CACHE_SHARE_OF_OBJECT_STORE = 0.45
#: Rows decoded (and augmented) on the driver to measure a split's bytes per row.
SIZE_PROBE_ROWS = 8
#: Rows per decode / augment batch at most; fewer where rows are large, so that a batch fits in one block.
DECODE_BATCH = 64
AUGMENT_BATCH = 256
#: Blocks are kept below 1/BLOCKS_PER_STORE of the object store (Ray Data's 128 MiB default stays on large stores).
#: Ray Data's backpressure budgets about half the store across operators and holds back whole blocks, so blocks
#: near that budget (a 256-row batch of 320x480 VOC crops is ~790 MB) overflow the store and spill to disk.
BLOCKS_PER_STORE = 16
#: Blocks per Ray CPU: enough to keep every CPU busy and let workers' shards balance, few enough that Ray's per-task
#: overhead stays small next to augmenting a block (the former 4 per CPU augmented CIFAR ~20% slower on 2 CPUs).
BLOCKS_PER_CPU = 2


@dataclass
class SplitData:
    """One split's pipeline plus what the run should know about it."""

    dataset: ray.data.Dataset
    rows: int
    cached: bool
    skipped: int | None  # rows dropped by the task's ``keep`` column; None when unknown (streamed, no skip_bad)
    digest: str  # of the split's index (what is read, with which labels), before shuffling


def index_digest(index: pd.DataFrame) -> str:
    """A short digest of an index's rows: the same files and labels give the same digest.

    Column by column, each cell's bytes with their length (:func:`_cell_bytes`): cells may hold lists or arrays (a
    detection image's boxes), which pandas' row hashing refuses, or raw bytes (CIFAR's pixels), which the CSV text
    this hashed before took 5.4 s to write for CIFAR-10's 50,000 training images (now 0.2 s).
    """
    digest = hashlib.sha1()
    for name in index.columns:
        digest.update(_cell_bytes(name))
        for value in index[name].tolist():
            digest.update(_cell_bytes(value))
    return digest.hexdigest()[:16]


def _cell_bytes(value: Any) -> bytes:
    """An index cell as bytes that differ whenever the cell does: its type's tag and content, length-prefixed."""
    if isinstance(value, bytes):
        tag, data = b"b", value
    elif isinstance(value, np.ndarray):
        tag, data = b"a", f"{value.dtype.str}{value.shape}".encode() + np.ascontiguousarray(value).tobytes()
    elif isinstance(value, (list, tuple)):
        tag, data = b"l", b"".join(_cell_bytes(item) for item in value)
    else:  # str, numbers, None: repr is exact for them
        tag, data = b"r", repr(value).encode()
    return tag + len(data).to_bytes(8, "little") + data


def task_path(task: Task) -> str:
    """``module:Class`` of ``task``: what the pipeline's map functions carry instead of the task object.

    Ray Data's coordinator actors (and Ray Train's dataset manager) unpickle a pipeline without running it; a task
    object there would import its module, torch and torchvision in each of them (seconds of CPU per process, see
    :mod:`pipelines.handoff`). The Ray tasks that run the maps import it once per process (:func:`task_at`).
    """
    return f"{type(task).__module__}:{type(task).__qualname__}"


@functools.cache
def task_at(path: str) -> Task:
    """The task named by :func:`task_path`, created once per process."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)()


@ray.remote(num_cpus=1)
def _import_task(path: str) -> None:
    task_at(path)


def warm_map_workers(path: str) -> None:
    """Start importing the task at ``path`` (:func:`task_path`; torch, torchvision: ~8 s of CPU here) in as many of
    Ray's worker processes as there are free CPUs, and return at once, so that the map tasks that follow find
    workers ready instead of starting them.

    Ray keeps worker processes per runtime environment, and this process's tasks inherit its own. The driver calls
    it while it opens the run and indexes the data, for the decode; a run's one training worker calls it as it
    starts when Ray Data's tasks augment (:func:`warm_augment_workers`): Ray Train gives its processes their own
    environment (Ray Train's variables as ``env_vars``), so the augment tasks, started from there, cannot use the
    driver's decode workers."""
    for _ in range(int(ray.available_resources().get("CPU", 0))):
        _import_task.remote(path)  # nothing waits for it: the map task that follows would import it too


def workers_read_whole_splits(cfg: Config) -> bool:
    """Whether the run's training worker reads each whole split itself, running its pipeline in its own process
    (one worker), rather than a shard from a coordinator actor per split (several workers: splitting a split for
    one worker would start that actor, a new process importing Ray Data, for nothing)."""
    return cfg.scaling.workers == 1


def warm_augment_workers(path: str, cfg: Config) -> None:
    """:func:`warm_map_workers` from a run's one training worker, where Ray Data's tasks augment the batches: the
    worker runs their pipeline itself, so they start in its Train environment, and their processes import torch
    while it imports the training loop and builds the model, not after the first epoch asks for a batch.

    With several workers each split's coordinator actor runs the pipeline, and its tasks did not use processes
    warmed from a worker (measured: 2 workers, the augment tasks ran in a new process): no warm-up there, whose
    import would only take CPU from the workers'."""
    if workers_read_whole_splits(cfg) and not augments_in_worker(cfg):
        warm_map_workers(path)


def _decode(batch: Batch, task: str, cfg: Config) -> Batch:
    return _drop_unkept(task_at(task).decode(batch, cfg))


def augment_batch(batch: Batch, task: str, cfg: Config, train: bool,
                  rng: np.random.Generator | None = None) -> Batch:
    """``task``'s augmentation of a decoded batch into pixels (``Task.augment_pixels``), only its tensor keys kept.
    Without ``rng`` a new unseeded generator on every call: each epoch re-executes the pipeline's augment map, so
    augmentation is fresh each epoch."""
    found = task_at(task)
    out = found.augment_pixels(batch, train, cfg, rng if rng is not None else np.random.default_rng())
    return {key: out[key] for key in found.tensor_keys}


def augments_in_worker(cfg: Config) -> bool:
    """Whether the training workers augment their batches themselves (``data.augment_on``; see the module doc)."""
    place = cfg.data.augment_on
    if place == "auto":
        return cfg.scaling.gpus_per_worker == 0
    if place in ("worker", "pipeline"):
        return place == "worker"
    raise ValueError(f'Unknown data.augment_on "{place}": use auto, worker or pipeline')


def _drop_unkept(batch: Batch) -> Batch:
    if KEEP_COLUMN not in batch:
        return batch
    keep = batch.pop(KEEP_COLUMN).astype(bool)
    return {key: value[keep] for key, value in batch.items()}


@dataclass
class RowBytes:
    """Bytes per row of a split after decoding (averaged over all rows, dropped ones too) and after augmentation."""

    decoded: float
    augmented: float


def count_skipped(decoded: ray.data.Dataset, rows: int, cached: bool, skip_bad: bool) -> int | None:
    """How many of the split's ``rows`` indexed samples the decode step dropped; None when not worth a pass.

    A materialised (``cached``) split counts from its blocks' metadata. A streamed one is decoded again, streaming,
    only under ``skip_bad``: its skipped files must be counted, and that pass is the price of knowing.
    """
    if not (cached or skip_bad):
        return None
    return rows - decoded.count()


def row_count(batch: Batch) -> int:
    """Rows of a batch (a dict of equally long columns)."""
    return len(next(iter(batch.values())))


def row_bytes(task: Task, cfg: Config, index: pd.DataFrame) -> RowBytes:
    """Decode and augment the first rows of ``index`` on the driver and measure them."""
    probe = index.head(SIZE_PROBE_ROWS)
    decoded = _decode({col: probe[col].to_numpy() for col in probe.columns}, task_path(task), cfg)
    decoded_per_row = sum(_nbytes(v) for v in decoded.values()) / max(len(probe), 1)
    kept = row_count(decoded)
    if not kept:  # every probe row dropped: the decoded size is the best guess left
        return RowBytes(decoded_per_row, decoded_per_row)
    augmented = augment_batch(decoded, task_path(task), cfg, train=False)
    return RowBytes(decoded_per_row, sum(_nbytes(v) for v in augmented.values()) / kept)


def block_bytes(object_store_bytes: float) -> int:
    """Target size of the pipeline's blocks: Ray Data's default, or less on a small object store."""
    default = ray.data.context.DEFAULT_TARGET_MAX_BLOCK_SIZE
    return min(default, int(object_store_bytes / BLOCKS_PER_STORE)) if object_store_bytes > 0 else default


def source_blocks(index: pd.DataFrame, max_block: int) -> int:
    """Blocks the index itself needs so that each stays under ``max_block`` bytes. Most indexes hold paths and are
    small; CIFAR's holds every image's raw bytes (50,000 images: ~165 MB), and a few such blocks, all put in the
    object store by ``from_pandas``, would each exceed a small store (bench_voc_memory.py --task cifar10)."""
    return min(len(index), -(-int(index.memory_usage(deep=True).sum()) // max(max_block, 1)))


def batch_rows(bytes_per_row: float, max_rows: int, max_bytes: int) -> int:
    """Rows per map batch: at most ``max_bytes`` worth and ``max_rows``, at least 1."""
    return max(1, min(max_rows, int(max_bytes // max(bytes_per_row, 1.0))))


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return sum(_nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 64))


def cache_room(capacity: float, free: float, runs: int = 1) -> float:
    """Bytes that one of ``runs`` runs starting at once (a sweep's concurrent trials, which all see the same free
    store) may cache in an object store of ``capacity`` bytes with ``free`` bytes unused
    (:data:`CACHE_SHARE_OF_OBJECT_STORE`); negative when there is no room."""
    return (free - (1 - CACHE_SHARE_OF_OBJECT_STORE) * capacity) / max(runs, 1)


def should_cache(mode: str, estimate: int, room: float) -> bool:
    """Whether a split of ``estimate`` decoded bytes is cached under ``data.cache`` ``mode``, with ``room`` bytes
    left to cache (:func:`cache_room`)."""
    if mode == "memory":
        return True
    if mode == "stream":
        return False
    if mode == "auto":
        return estimate <= room
    raise ValueError(f'Unknown data.cache mode "{mode}": use auto, memory or stream')


def build_split(task: Task, cfg: Config, split: str, train: bool, concurrent_runs: int = 1) -> SplitData:
    """The Ray Data pipeline of one split: decoded (cached or streaming), then augmented. A cached split takes room
    in the object store that the next split's cache rule sees (:func:`cache_room`): build the training split, read
    and augmented every epoch, first. ``concurrent_runs``: runs that may build their splits at the same time as
    this one (a sweep's concurrent trials), which share the room to cache."""
    index = task.index(split, cfg)
    if index.empty:
        raise ValueError(f"{task.name}: split {split!r} under {cfg.data.root} has no samples")
    digest = index_digest(index)
    if train:
        # Readers list samples in folder/class order: shuffle once here, and the block order every epoch below.
        index = index.sample(frac=1.0, random_state=cfg.train.seed).reset_index(drop=True)
    capacity = ray.cluster_resources()
    cpus = max(1, int(capacity.get("CPU", 1)))
    store = ray.available_resources().get("object_store_memory", 0.0)  # free now
    sizes, max_block = row_bytes(task, cfg, index), block_bytes(store)
    estimate = int(sizes.decoded * len(index))
    room = cache_room(capacity.get("object_store_memory", 0.0), store, concurrent_runs)
    cached = should_cache(cfg.data.cache, estimate, room)
    # A streamed training split is shuffled by its index blocks, before the decode: as many as it has decoded blocks.
    # (RandomizeBlockOrder waits for all of its input, so after the decode it would hold the whole decoded split in
    # the object store, spilled to disk: a 2.2 GB VOC epoch on a 300 MB store spilled 9.5 GB, bench_voc_memory.py.)
    shuffle_index = train and not cached
    blocks = max(1, min(len(index) // DECODE_BATCH, BLOCKS_PER_CPU * cpus), source_blocks(index, max_block))
    if shuffle_index:
        blocks = max(blocks, min(len(index), -(-estimate // max_block)))
    bounds = np.linspace(0, len(index), blocks + 1).astype(int)
    chunks = [index.iloc[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
    decode_rows = batch_rows(sizes.decoded, DECODE_BATCH, max_block)
    augment_rows = batch_rows(sizes.augmented, AUGMENT_BATCH, max_block)
    source = ray.data.from_pandas(chunks)
    source.context.target_max_block_size = max_block  # the context is this pipeline's own copy
    if shuffle_index:
        source = source.randomize_block_order()
    ds = source.map_batches(
        _decode, fn_kwargs={"task": task_path(task), "cfg": cfg}, batch_format="numpy", batch_size=decode_rows
    )
    kept = "cached in object store" if cached else "streamed" if cfg.data.cache == "stream" \
        else f"streamed ({max(room, 0) / 1e6:.0f} MB of the object store left to cache)"
    log.info(
        "%s/%s: %d samples, ~%.1f MB decoded -> %s, augmented %s (blocks <= %.0f MB: %d rows per decode batch)",
        task.name, split, len(index), estimate / 1e6, kept,
        "by the training workers" if augments_in_worker(cfg) else f"in Ray tasks, {augment_rows} rows per batch",
        max_block / 1e6, decode_rows,
    )
    if cached:
        ds = ds.materialize()
    skipped = count_skipped(ds, len(index), cached, cfg.data.skip_bad)
    if skipped:
        log.warning("%s/%s: skipped %d of %d samples (see the task's log for why)", task.name, split, skipped,
                    len(index))
    if train and cached:
        ds = ds.randomize_block_order()
    if not augments_in_worker(cfg):
        ds = ds.map_batches(
            augment_batch,
            fn_kwargs={"task": task_path(task), "cfg": cfg, "train": train},
            batch_format="numpy",
            batch_size=augment_rows,
        )
    return SplitData(dataset=ds, rows=len(index) - (skipped or 0), cached=cached, skipped=skipped, digest=digest)
