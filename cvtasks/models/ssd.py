"""TinySSD, the single-shot multibox detector of d2l 13.7, with a configurable channel width.

A base network of three down-sampling blocks (16, 32, 64 channels at width 1) and four more blocks give five
feature maps; a 256x256 input yields 32x32, 16x16, 8x8, 4x4 and 1x1 maps. Every pixel of map i carries
len(SIZES[i]) + len(RATIOS) - 1 = 4 anchors (cvtasks.boxes.multibox_prior), so 5,444 anchors in all at 256x256.
Each map has a 3x3 convolution predicting, per anchor, num_classes + 1 class scores (background first) and another
predicting 4 box offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cvtasks.boxes import multibox_prior

#: Anchor sizes (fractions of the image) per feature map, from fine to coarse, and their width/height ratios (d2l).
SIZES: tuple[tuple[float, float], ...] = ((0.2, 0.272), (0.37, 0.447), (0.54, 0.619), (0.71, 0.79), (0.88, 0.961))
RATIOS: tuple[float, ...] = (1.0, 2.0, 0.5)
BASE_CHANNELS = (16, 32, 64)  # the base network's down-sampling blocks
BLOCK_CHANNELS = 128  # the later blocks
NUM_SCALES = len(SIZES)


def anchors_per_pixel(sizes: Sequence[float], ratios: Sequence[float]) -> int:
    return len(sizes) + len(ratios) - 1


def down_sample_blk(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv + batch-norm + ReLU layers, then a 2x2 max-pool halving height and width."""
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.BatchNorm2d(out_channels),
                   nn.ReLU()]
        in_channels = out_channels
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def base_net(width: float = 1.0) -> nn.Sequential:
    channels = [3] + [_scaled(c, width) for c in BASE_CHANNELS]
    return nn.Sequential(*[down_sample_blk(channels[i], channels[i + 1]) for i in range(len(BASE_CHANNELS))])


def flatten_pred(pred: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H * W * C), channels last so each pixel's predictions stay together (anchor order)."""
    return torch.flatten(pred.permute(0, 2, 3, 1), start_dim=1)


def concat_preds(preds: Sequence[Tensor]) -> Tensor:
    return torch.cat([flatten_pred(p) for p in preds], dim=1)


class TinySSD(nn.Module):
    """forward(images (B, 3, H, W)) -> (anchors [1, A, 4], class scores [B, A, num_classes + 1], offsets [B, A * 4]).

    Class scores are logits with background at index 0; offsets are cvtasks.boxes.offset_boxes codes.
    """

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1 or width <= 0:
            raise ValueError(f"TinySSD needs num_classes >= 1 and width > 0, got {num_classes}, {width}")
        self.num_classes = num_classes
        self.width = width
        self.sizes, self.ratios = SIZES, RATIOS
        block = _scaled(BLOCK_CHANNELS, width)
        in_channels = [_scaled(BASE_CHANNELS[-1], width)] + [block] * (NUM_SCALES - 1)
        self.blocks = nn.ModuleList([
            base_net(width),
            down_sample_blk(in_channels[0], block),
            down_sample_blk(block, block),
            down_sample_blk(block, block),
            nn.AdaptiveMaxPool2d((1, 1)),
        ])
        per_pixel = [anchors_per_pixel(s, self.ratios) for s in self.sizes]
        self.cls_predictors = nn.ModuleList([
            nn.Conv2d(c, k * (num_classes + 1), kernel_size=3, padding=1) for c, k in zip(in_channels, per_pixel)
        ])
        self.bbox_predictors = nn.ModuleList([
            nn.Conv2d(c, k * 4, kernel_size=3, padding=1) for c, k in zip(in_channels, per_pixel)
        ])

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """The five feature maps, fine to coarse."""
        maps, x = [], images
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return maps

    def scale_anchors(self, feature_maps: Sequence[Tensor]) -> list[Tensor]:
        """Anchors [1, H_i * W_i * k, 4] of each feature map (d2l's multibox_prior with that scale's sizes)."""
        return [multibox_prior(fmap, sizes, self.ratios) for fmap, sizes in zip(feature_maps, self.sizes)]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        maps = self.feature_maps(images)
        anchors = torch.cat(self.scale_anchors(maps), dim=1)
        cls_preds = concat_preds([p(m) for p, m in zip(self.cls_predictors, maps)])
        bbox_preds = concat_preds([p(m) for p, m in zip(self.bbox_predictors, maps)])
        return anchors, cls_preds.reshape(cls_preds.shape[0], -1, self.num_classes + 1), bbox_preds
