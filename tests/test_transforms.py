"""Batch transforms against torchvision's own transforms on the same images, and policy lookup."""

import numpy as np
import pytest
import torch
import torchvision.transforms as tvt
import torchvision.transforms.functional as TF
from PIL import Image

from cvtasks import pictures
from cvtasks import transforms as T


def random_images(rng, n=4, h=9, w=13):
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_hflip_mirrors_exactly_the_chosen_images():
    rng = np.random.default_rng(0)
    images = random_images(rng, n=64)
    out = T.hflip(images, np.random.default_rng(1))
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, images, strict=True)])
    assert np.all(flipped ^ kept)
    assert np.array_equal(flipped, np.random.default_rng(1).random(64) < 0.5)
    assert np.array_equal(T.hflip(images, rng, p=1.0), images[:, :, ::-1])
    assert np.array_equal(T.hflip(images, rng, p=0.0), images)


def test_mirror_columns_and_fill_color_in_place_equal_numpy():
    rng = np.random.default_rng(0)
    for shape in ((5, 7, 3), (5, 7), (1, 1, 3), (75, 300, 3)):  # the last in three bands of rows
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        mirrored = array.copy()
        T.mirror_columns(mirrored)
        assert np.array_equal(mirrored, array[:, ::-1])
    batch = random_images(rng)
    original = batch.copy()
    T.mirror_columns(batch[1])  # a view into a batch: only that image changes
    assert np.array_equal(batch[1], original[1, :, ::-1])
    assert np.array_equal(np.delete(batch, 1, axis=0), np.delete(original, 1, axis=0))
    filled = random_images(rng, n=1)[0]
    T.fill_color(filled, (1, 2, 3))
    assert np.array_equal(filled, np.broadcast_to(np.array([1, 2, 3], np.uint8), filled.shape))


def test_resize_center_crop_equals_torchvision_on_pil():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((80, 100), (100, 77), (72, 72))]
    reference = tvt.Compose([tvt.Resize(72), tvt.CenterCrop(64)])
    out = T.resize_center_crop(images, 72, 64)
    assert out.shape == (3, 64, 64, 3) and out.dtype == np.uint8
    for mine, image in zip(out, images, strict=True):
        assert np.array_equal(mine, np.asarray(reference(Image.fromarray(image))))


def test_resize_center_crop_of_a_stack_at_scale_is_a_slice():
    images = random_images(np.random.default_rng(0), n=3, h=32, w=40)
    out = T.resize_center_crop(images, 32, (30, 30))
    assert np.array_equal(out, images[:, 1:31, 5:35])
    assert np.array_equal(out, T.resize_center_crop(list(images), 32, (30, 30)))
    with pytest.raises(ValueError, match="smaller than the centre crop"):
        T.resize_center_crop(images, 32, 36)


def test_resized_crop_equals_torchvision_on_pil():
    image = random_images(np.random.default_rng(0), n=1, h=50, w=70)[0]
    box = (5, 11, 30, 41)
    expected = TF.resized_crop(Image.fromarray(image), *box, [24, 32])
    assert np.array_equal(T.resized_crop(image, box, (24, 32)), np.asarray(expected))


def test_random_resized_crop_sizes_and_boxes():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 90), (64, 64), (90, 33))]
    assert T.random_resized_crop(images, 24, rng).shape == (3, 24, 24, 3)
    assert T.random_resized_crop(images, (24, 32), rng).shape == (3, 24, 32, 3)
    for _ in range(200):
        top, left, h, w = T.random_resized_crop_box(40, 90, rng, scale=(0.2, 0.9))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 90
        assert 0.2 * 3600 * 0.8 <= h * w <= 0.9 * 3600 * 1.2  # rounding of h and w aside
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.2


@pytest.mark.parametrize("height,width", [(40, 90), (90, 33), (50, 50)])
def test_random_resized_crop_falls_back_to_torchvision_centre_crop(height, width):
    # No crop of 150-200 % of the area fits: torchvision then takes its deterministic centre crop.
    mine = T.random_resized_crop_box(height, width, np.random.default_rng(0), scale=(1.5, 2.0))
    theirs = tvt.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), scale=[1.5, 2.0],
                                              ratio=[3 / 4, 4 / 3])
    assert mine == tuple(theirs)


def test_to_input_values_and_round_trip():
    mean, std = np.array(T.IMAGENET_MEAN, np.float32), np.array(T.IMAGENET_STD, np.float32)
    x = np.stack([np.broadcast_to(mean, (2, 2, 3)), np.ones((2, 2, 3), np.float32)])
    out = T.to_input(x, mean, std)
    assert out.shape == (2, 3, 2, 2) and out.dtype == np.float32 and out.flags.c_contiguous
    assert np.allclose(out[0], 0.0, atol=1e-7)
    assert np.allclose(out[1, :, 0, 0], (1 - mean) / std)  # e.g. red (1 - 0.485) / 0.229 = 2.2489
    assert out[1, 0, 0, 0] == pytest.approx(2.2489, abs=1e-4)
    images = random_images(np.random.default_rng(0))
    nchw = T.to_input(images, T.IMAGENET_MEAN, T.IMAGENET_STD)
    assert nchw.shape == (4, 3, 9, 13) and nchw.dtype == np.float32
    assert np.array_equal(pictures.denormalize(nchw), images)
    assert np.array_equal(pictures.denormalize(T.to_input(images), None, None), images)


@pytest.mark.parametrize("stats", [(None, None), (T.IMAGENET_MEAN, T.IMAGENET_STD)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_pixels_to_input_gives_to_inputs_values_in_either_memory_format(stats, memory_format):
    """What the training worker feeds the model from shipped pixels equals the numpy transform, to the bit: on the
    CPU path and in the torch operations accelerators run (here on CPU tensors), for uint8 and float pixels."""
    images = np.random.default_rng(0).integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    for pixels in (images, T.to_unit_float(images)):
        want = T.to_input(pixels, *stats)
        for convert in (T.pixels_to_input, T.tensor_to_input):
            got = convert(torch.from_numpy(pixels), *stats, memory_format=memory_format)
            assert got.dtype == torch.float32 and got.is_contiguous(memory_format=memory_format)
            np.testing.assert_array_equal(got.numpy(), want)


def test_to_input_equals_torchvision_to_tensor_and_normalize():
    images = random_images(np.random.default_rng(1))
    theirs = torch.stack([TF.normalize(TF.to_tensor(image), T.IMAGENET_MEAN, T.IMAGENET_STD) for image in images])
    assert np.allclose(T.to_input(images, T.IMAGENET_MEAN, T.IMAGENET_STD), theirs.numpy(), atol=1e-5)
    unit = torch.stack([TF.to_tensor(image) for image in images]).numpy()
    assert np.allclose(T.to_input(images), unit, atol=1e-7)
    assert np.allclose(T.to_input(T.to_unit_float(images)), unit, atol=1e-7)  # float input: [0, 1] already


def torchvision_per_image(fn, images, factors):
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = torch.stack([fn(t, float(f)) for t, f in zip(tensors, factors, strict=True)])
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("mine,theirs,factors", [
    (T.adjust_brightness, TF.adjust_brightness, [0.5, 1.0, 1.5, 1.3]),
    (T.adjust_contrast, TF.adjust_contrast, [0.5, 1.0, 1.5, 0.0]),
    (T.adjust_saturation, TF.adjust_saturation, [0.5, 1.0, 1.5, 0.0]),
    (T.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.37]),
])
def test_colour_adjustments_equal_torchvision(mine, theirs, factors):
    images = T.to_unit_float(random_images(np.random.default_rng(0)))
    images[0, 0, 0] = 0.5  # a gray pixel: hue undefined
    factors = np.array(factors, np.float32)
    assert np.allclose(mine(images, factors), torchvision_per_image(theirs, images, factors), atol=1e-5)


def test_hsv_round_trip():
    images = T.to_unit_float(random_images(np.random.default_rng(0)))
    assert np.allclose(T.hsv_to_rgb(T.rgb_to_hsv(images)), images, atol=1e-6)


def test_color_jitter_draws_one_factor_per_image():
    images = np.full((64, 4, 4, 3), 0.4, np.float32)
    out = T.color_jitter(images, np.random.default_rng(0), brightness=0.5)
    factors = out[:, 0, 0, 0] / 0.4
    assert np.allclose(out, factors[:, None, None, None] * 0.4)
    assert factors.min() >= 0.5 and factors.max() <= 1.5 and factors.std() > 0.1
    assert np.array_equal(T.color_jitter(images, np.random.default_rng(0)), images)
    with pytest.raises(ValueError, match="hue"):
        T.color_jitter(images, np.random.default_rng(0), hue=0.7)


def test_policy_lookup():
    assert T.get_policy("flip") == T.AugmentPolicy(flip=True)
    assert T.get_policy("flip_crop") == T.AugmentPolicy(crop=True, flip=True)
    assert T.get_policy("flip_color") == T.AugmentPolicy(flip=True, color=True)
    assert T.EVAL_POLICY == T.get_policy("none") == T.AugmentPolicy()
    with pytest.raises(ValueError, match='Unknown data augmentation policy "rotate"; valid: none, flip,'):
        T.get_policy("rotate")
