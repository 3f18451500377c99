"""RoI pooling and RoI align (d2l 13.8) with torchvision's ops, pinned to the book's printed example.

Fast and Faster R-CNN cut each region proposal out of one shared feature map and pool it to a fixed grid
(``roi_pool``): the region's corners and its bins' edges are rounded to whole feature cells, so a bin may be a cell
larger or smaller than its neighbour and the pooled grid sits up to a cell (here 1 / spatial_scale = 10 pixels) off
the region. For class scores and boxes that error is harmless; for the per-pixel masks of Mask R-CNN it misaligns
every mask, so Mask R-CNN replaces it with ``roi_align``: no rounding, each bin is sampled by bilinear interpolation
at exact positions.
"""

from __future__ import annotations

import torch
from torchvision.ops import roi_align, roi_pool

#: The book's 4x4 feature map and two regions (batch index, x1, y1, x2, y2) in input pixels, at 1/10 scale.
FEATURES = torch.arange(16.0).reshape(1, 1, 4, 4)
REGIONS = torch.tensor([[0, 0, 0, 20, 20], [0, 0, 10, 30, 30]], dtype=torch.float32)


def test_roi_pool_reproduces_the_books_example():
    pooled = roi_pool(FEATURES, REGIONS, output_size=(2, 2), spatial_scale=0.1)
    expected = torch.tensor([[[[5.0, 6.0], [9.0, 10.0]]], [[[9.0, 11.0], [13.0, 15.0]]]])
    torch.testing.assert_close(pooled, expected)


def test_roi_align_samples_the_exact_region_instead():
    """Values worked out by hand: feature (row r, column c) holds 4r + c, and bilinear interpolation of that plane
    is exact. Region 1 covers feature cells [0, 2] x [0, 2]: 1x1 bins, one sample at each bin's centre, e.g.
    (0.5, 0.5) -> 2.5. Region 2 covers x in [0, 3], y in [1, 3]: bins 1.5 wide and 1 high, two samples across each
    (x = 0.375 and 1.125 in the first bin at y = 1.5) -> 4 * 1.5 + 0.75 = 6.75."""
    aligned = roi_align(FEATURES, REGIONS, output_size=(2, 2), spatial_scale=0.1, sampling_ratio=-1)
    expected = torch.tensor([[[[2.5, 3.5], [6.5, 7.5]]], [[[6.75, 8.25], [10.75, 12.25]]]])
    torch.testing.assert_close(aligned, expected)
    pooled = roi_pool(FEATURES, REGIONS, output_size=(2, 2), spatial_scale=0.1)
    assert not torch.allclose(aligned, pooled)  # max over rounded cells vs samples at exact positions
