"""Fully convolutional network (d2l 13.11): ResNet-18 features, 1x1 class scores, 32x transposed-conv upsampling."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from cvtasks.models.weights import load_backbone_state, resolve_state_dict

log = logging.getLogger(__name__)

#: Total downsampling of ResNet-18's feature layers; inputs are padded to a multiple of it.
OUTPUT_STRIDE = 32
#: Transposed conv that undoes the stride exactly: kernel 2s, padding s/2 -> output = s * input.
UPSAMPLE_KERNEL = 2 * OUTPUT_STRIDE
UPSAMPLE_PADDING = OUTPUT_STRIDE // 2
FEATURE_CHANNELS = 512
#: ResNet-18 children left out of the backbone: global average pool and the ImageNet classifier.
DROPPED_CHILDREN = ("avgpool", "fc")


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """Transposed-convolution weight (in_channels, out_channels, k, k) that upsamples by bilinear interpolation.

    With stride s, kernel 2s and padding s/2 it reproduces ``F.interpolate(mode="bilinear", align_corners=False)``
    away from the borders. Channel c maps to channel c only (no mixing); channels beyond ``min(in, out)`` get zeros.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - torch.abs(torch.arange(kernel_size, dtype=torch.float32) - center) / factor  # (k,)
    filt = taps[:, None] * taps[None, :]  # (k, k)
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size)
    channels = torch.arange(min(in_channels, out_channels))
    weight[channels, channels] = filt
    return weight


def resnet18_backbone() -> nn.Sequential:
    """torchvision ResNet-18 without avgpool and fc: (N, 3, H, W) -> (N, 512, H/32, W/32) for H, W divisible by 32.

    Children keep their torchvision names, so ResNet-18 state dicts load into it unchanged (less ``fc.*``).
    """
    net = resnet18(weights=None)
    return nn.Sequential(OrderedDict((name, m) for name, m in net.named_children() if name not in DROPPED_CHILDREN))


class FCN(nn.Module):
    """(N, 3, H, W) ImageNet-normalised images -> (N, num_classes, H, W) per-pixel class scores.

    Inputs whose sides are not multiples of 32 are zero-padded (zero = the mean colour after normalisation) on
    the bottom and right, and the scores are cropped back to (H, W).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.backbone = resnet18_backbone()
        self.classifier = nn.Conv2d(FEATURE_CHANNELS, num_classes, kernel_size=1)
        self.upsample = nn.ConvTranspose2d(
            num_classes, num_classes, kernel_size=UPSAMPLE_KERNEL, stride=OUTPUT_STRIDE, padding=UPSAMPLE_PADDING
        )
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        with torch.no_grad():
            self.upsample.weight.copy_(bilinear_kernel(num_classes, num_classes, UPSAMPLE_KERNEL))
            self.upsample.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % OUTPUT_STRIDE, -width % OUTPUT_STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        scores = self.upsample(self.classifier(self.backbone(x)))
        return scores[..., :height, :width]

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers that are new on top of the backbone (1x1 classifier and upsampling)."""
        return [*self.classifier.parameters(), *self.upsample.parameters()]


def build_fcn(num_classes: int, weights: str) -> FCN:
    """An FCN whose backbone starts from ``weights`` (see :mod:`cvtasks.models.weights`).

    A file holding a whole FCN of the same shape (e.g. an earlier raycv VOC model) is loaded in full; any other
    ResNet-18 state dict fills the backbone only. The result carries ``weights_description``.
    """
    model = FCN(num_classes)
    state_dict, description = resolve_state_dict(weights, ResNet18_Weights)
    if state_dict is not None:
        own = model.state_dict()
        if own.keys() == state_dict.keys() and all(own[k].shape == v.shape for k, v in state_dict.items()):
            model.load_state_dict(state_dict)
            description += " (whole FCN)"
        else:
            load_backbone_state(model.backbone, state_dict, description)
            description += " (backbone)"
    log.info("FCN weights: %s", description)
    model.weights_description = description
    return model
