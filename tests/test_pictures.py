"""cvtasks.pictures against known pixels: denormalising, grids, captioned tiles, boxes and mask overlays."""

import numpy as np
import torch

from cvtasks import pictures
from cvtasks import transforms as T

RED, BLUE, BLACK, WHITE = (255, 0, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)


def test_denormalize_undoes_imagenet_normalisation_of_known_pixels():
    images = np.array([[[[0, 128, 255], [124, 116, 104]], [[255, 255, 255], [1, 2, 3]]]], dtype=np.uint8)  # 1x2x2
    mean, std = np.array(T.IMAGENET_MEAN, np.float32), np.array(T.IMAGENET_STD, np.float32)
    normalised = ((images / np.float32(255) - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    assert np.array_equal(pictures.denormalize(normalised), images)
    assert np.array_equal(pictures.denormalize(torch.from_numpy(normalised)), images)  # tensors alike
    # zero input is the ImageNet mean colour; far outside [0, 1] clips to black and white
    assert pictures.denormalize(np.zeros((1, 3, 1, 1), np.float32))[0, 0, 0].tolist() == [124, 116, 104]
    extremes = np.array([-10.0, 10.0, 0.0], np.float32).reshape(1, 3, 1, 1)
    assert pictures.denormalize(extremes)[0, 0, 0].tolist() == [0, 255, 104]


def test_denormalize_without_statistics_only_scales():
    x = np.array([[0.0, 0.5], [1.0, 0.25], [-1.0, 2.0]], np.float32).reshape(1, 3, 1, 2)  # channels of 2 pixels
    # 0.5 * 255 = 127.5 rounds to even, 0.25 * 255 = 63.75 to 64; outside [0, 1] clips
    assert pictures.denormalize(x, None, None).tolist() == [[[[0, 255, 0], [128, 64, 255]]]]


def test_grid_lays_out_tiles_with_white_gaps():
    tiles = [np.full((4, 5, 3), v, np.uint8) for v in (10, 20, 30)]
    sheet = np.asarray(pictures.grid(tiles, columns=2, gap=2))
    assert sheet.shape == (2 * (4 + 2) + 2, 2 * (5 + 2) + 2, 3)
    assert (sheet[2:6, 2:7] == 10).all() and (sheet[2:6, 9:14] == 20).all() and (sheet[8:12, 2:7] == 30).all()
    gaps = np.ones(sheet.shape[:2], bool)
    gaps[2:6, 2:7] = gaps[2:6, 9:14] = gaps[8:12, 2:7] = False
    assert (sheet[gaps] == 255).all()  # the gaps and the empty fourth cell


def test_grid_cells_fit_the_largest_tile_and_a_lone_tile_keeps_its_border():
    small, large = np.zeros((2, 3, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)
    sheet = np.asarray(pictures.grid([small, large], columns=2, gap=1))
    assert sheet.shape == (1 + 4 + 1, 1 + 2 * (6 + 1), 3)
    assert (sheet[1:3, 1:4] == 0).all() and (sheet[3:5, 1:7] == 255).all() and (sheet[1:3, 4:7] == 255).all()
    lone = np.asarray(pictures.grid([small], columns=4))
    assert lone.shape == (2 + 2 * pictures.GAP, 3 + 2 * pictures.GAP, 3)
    assert (lone[2:4, 2:5] == 0).all() and lone[0, 0].tolist() == list(WHITE)


def test_captioned_tile_enlarges_small_images_over_a_text_strip():
    image = np.zeros((32, 32, 3), np.uint8)
    image[0, 0] = RED
    tile = pictures.captioned_tile(image, [("cat", BLUE), ("dog", RED)])
    scale = pictures.TILE_MIN_SIDE // 32
    assert tile.shape == (32 * scale + 2 * pictures.CAPTION_LINE, 32 * scale, 3)
    assert (tile[:scale, :scale] == RED).all() and (tile[scale, scale] == BLACK).all()  # nearest-neighbour
    first, second = (tile[32 * scale + i * pictures.CAPTION_LINE:][:pictures.CAPTION_LINE] for i in range(2))
    for strip, full in ((first, 2), (second, 0)):  # antialiased text over white keeps its colour's full channel
        ink = strip[strip.min(axis=-1) < 255]
        assert len(ink) and (ink[:, full] == 255).all()


def test_to_pixels_scales_fractions_by_width_and_height():
    assert pictures.to_pixels(np.array([0.1, 0.2, 0.5, 1.0]), height=10, width=20).tolist() == [[2, 2, 10, 10]]


def test_draw_boxes_outlines_known_pixels():
    image = np.zeros((20, 20, 3), np.uint8)
    drawn = pictures.draw_boxes(image, np.array([[5, 5, 14, 14]]), RED)
    outline = np.zeros((20, 20), bool)
    outline[5:15, 5:15] = True
    inner = slice(5 + pictures.LINE_WIDTH, 15 - pictures.LINE_WIDTH)
    outline[inner, inner] = False
    assert (drawn[outline] == RED).all() and (drawn[~outline] == BLACK).all()
    assert (image == 0).all()  # drawn on a copy


def test_draw_boxes_puts_captions_above_or_below_in_the_box_colour():
    image = np.zeros((60, 60, 3), np.uint8)
    boxes = np.array([[10, 20, 40, 30], [10, 20, 40, 30]])
    above = pictures.draw_boxes(image, boxes[:1], BLUE, ["banana"])
    assert above[19, 10].tolist() == list(BLUE) and above[31, 10].tolist() == list(BLACK)
    assert (above[5:20, 10:40] == WHITE).all(axis=-1).any()  # white text on the blue strip
    below = pictures.draw_boxes(image, boxes, [RED, BLUE], ["a", "b"], below=True)
    assert below[31, 10].tolist() == list(BLUE)  # the second box's colour and strip are drawn last
    assert below[19, 10].tolist() == list(BLACK)


def test_colorize_and_overlay_colour_known_pixels():
    palette = np.zeros((256, 3), np.uint8)
    palette[1], palette[255] = RED, (200, 200, 100)
    mask = np.array([[0, 1], [255, 7]])
    assert pictures.colorize(mask, palette).tolist() == [[[0, 0, 0], [255, 0, 0]], [[200, 200, 100], [0, 0, 0]]]
    image = np.full((2, 2, 3), 100, np.uint8)
    out = pictures.overlay(image, mask, palette, alpha=0.5)
    # background unchanged; 0.5 * 100 + 0.5 * 255 = 177.5 rounds to even; class 7's black palette entry still blends
    assert out.tolist() == [[[100, 100, 100], [178, 50, 50]], [[150, 150, 100], [50, 50, 50]]]
    assert pictures.overlay(image, mask, palette, alpha=1.0)[0, 1].tolist() == list(RED)
