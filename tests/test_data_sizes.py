"""pipelines.data sizing: blocks small next to the object store, batches that fit a block, and which splits a run
caches (no Ray started)."""

from __future__ import annotations

import ray.data

from cvtasks.demo import voc as voc_demo
from cvtasks.tasks.voc import VocTask
from pipelines.data import BLOCKS_PER_STORE, batch_rows, block_bytes, cache_room, row_bytes, should_cache
from tests.configs import at_root, typed_config

MB = 1 << 20
DEFAULT_BLOCK = ray.data.context.DEFAULT_TARGET_MAX_BLOCK_SIZE


def test_blocks_shrink_only_on_a_small_object_store():
    assert block_bytes(300 * MB) == 300 * MB // BLOCKS_PER_STORE < DEFAULT_BLOCK
    assert block_bytes(64_000 * MB) == DEFAULT_BLOCK
    assert block_bytes(0.0) == DEFAULT_BLOCK  # store size unknown


def test_batches_fit_a_block_and_keep_their_row_caps():
    voc_crop_row = 320 * 480 * (3 + 1)  # uint8 pixels + uint8 mask
    assert batch_rows(voc_crop_row, 256, 20 * MB) == 20 * MB // voc_crop_row == 34
    assert batch_rows(3 * 32 * 32, 256, DEFAULT_BLOCK) == 256  # CIFAR rows: the cap
    assert batch_rows(10**9, 64, 20 * MB) == 1  # one row larger than a block still makes progress


def test_row_bytes_measures_decoded_and_augmented_rows(tmp_path):
    voc_demo.write(tmp_path, seed=0, n_train=4, n_val=1, min_side=40, max_side=60)
    cfg = typed_config("voc", {"augment": {"crop_size": [32, 48], "small": "pad", "hflip": 0.5}})
    task = VocTask()
    index = task.index("train", at_root(cfg, str(tmp_path)))
    sizes = row_bytes(task, cfg, index)
    decoded = task.decode({c: index[c].to_numpy() for c in index.columns}, cfg)
    pixels = sum(image.shape[0] * image.shape[1] for image in decoded["image"]) / len(index)
    assert sizes.decoded == 4 * pixels  # RGB + mask bytes per pixel (the keep flag is dropped)
    assert sizes.augmented == 32 * 48 * (3 + 1)  # augmented pixels (uint8 RGB) and the uint8 mask


def test_a_split_is_cached_while_the_store_stays_within_its_share():
    """VOC at full size on a 5.25 GB store: the 2.2 GB training split is cached in the empty store; then the 1.1 GB
    validation split streams, as both would not fit in 45% of the store (a smaller one would be cached); 4x VOC
    streams, and what other jobs hold counts as the run's own splits do."""
    store, train, val = 5_250 * MB, 2_200 * MB, 1_100 * MB
    assert should_cache("auto", train, cache_room(store, free=store))
    assert not should_cache("auto", val, cache_room(store, free=store - train))
    assert should_cache("auto", 100 * MB, cache_room(store, free=store - train))
    assert not should_cache("auto", train, cache_room(store, free=store - 500 * MB))
    assert not should_cache("auto", 4 * train, cache_room(store, free=store))
    assert should_cache("memory", 4 * train, cache_room(store, free=0))  # memory: always
    assert not should_cache("stream", 1, cache_room(store, free=store))


def test_concurrent_runs_share_the_room_to_cache():
    """A sweep's trials that start together all see the same free store: each may cache only its share."""
    store = 5_250 * MB
    alone = cache_room(store, free=store)
    assert cache_room(store, free=store, runs=2) == alone / 2
    assert should_cache("auto", 1_500 * MB, alone) and not should_cache("auto", 1_500 * MB, alone / 2)
