"""ResNet-18 models of the two classification tasks.

``cifar_resnet18``: d2l's CIFAR variant (d2l 13.1 ``d2l.resnet18``; erratum 9: not torchvision's ImageNet net):
a 3x3 stride-1 stem without max-pool, so 32x32 inputs keep their resolution into the first stage.
``finetune_resnet18``: torchvision's ImageNet ResNet-18 with a new ``fc`` head, backbone weights from a spec
(d2l 13.2 fine-tuning).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.models import resnet18

from cvtasks.models.weights import RESNET_HEAD_PREFIX, load_resnet18_backbone_weights

log = logging.getLogger(__name__)

#: Channel multipliers of the four stages relative to ``width``; the blocks per stage of ResNet-18.
STAGE_MULTIPLIERS = (1, 2, 4, 8)
BLOCKS_PER_STAGE = 2
RESNET18_FEATURES = 512  # torchvision resnet18's fc input


class Residual(nn.Module):
    """d2l's residual block: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus the input (through a strided 1x1 conv when the
    shape changes), then ReLU. (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride) if reshape else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.shortcut is None else self.shortcut(x)))


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """d2l's CIFAR ResNet-18; ``width`` is the first stage's channels (d2l: 64; the CPU demo uses 16).

    float (N, in_channels, H, W) -> class scores (N, num_classes). Modules: ``stem_conv``, ``stem_bn``,
    ``stem_relu``, ``stage1``..``stage4`` (stages 2-4 halve the resolution), ``pool``, ``flatten``, ``fc``.
    Convolutions and ``fc`` start xavier-uniform, as d2l's ``init_weights`` in its augmentation experiments.
    """
    widths = [width * m for m in STAGE_MULTIPLIERS]
    layers: list[tuple[str, nn.Module]] = [
        ("stem_conv", nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1)),
        ("stem_bn", nn.BatchNorm2d(widths[0])),
        ("stem_relu", nn.ReLU(inplace=True)),
    ]
    channels = widths[0]
    for i, out_channels in enumerate(widths):
        blocks = [Residual(channels, out_channels, stride=1 if i == 0 else 2)]
        blocks += [Residual(out_channels, out_channels) for _ in range(BLOCKS_PER_STAGE - 1)]
        layers.append((f"stage{i + 1}", nn.Sequential(*blocks)))
        channels = out_channels
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(channels, num_classes))]
    model = nn.Sequential(OrderedDict(layers))
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
    return model


def finetune_resnet18(num_classes: int, weights: str) -> nn.Module:
    """torchvision ResNet-18 whose backbone starts from ``weights`` (``imagenet``, ``scratch`` or a file, see
    :mod:`cvtasks.models.weights`) and whose new ``fc`` head (xavier-uniform, as d2l) has ``num_classes`` outputs.

    float (N, 3, H, W), ImageNet-normalised -> (N, num_classes). The result carries ``weights_description``.
    """
    model = resnet18(weights=None)
    description = load_resnet18_backbone_weights(weights, model)
    model.fc = nn.Linear(RESNET18_FEATURES, num_classes)
    nn.init.xavier_uniform_(model.fc.weight)
    model.weights_description = description
    log.debug("ResNet-18 backbone weights: %s", description)  # the driver has said which (raycv.weights tag)
    return model


def head_param_groups(model: nn.Module, head_lr_mult: float) -> list[dict[str, Any]]:
    """Optimizer groups of a torchvision ResNet: the ``fc`` head at ``head_lr_mult`` x the base lr, the rest at 1x."""
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.startswith(RESNET_HEAD_PREFIX) else body).append(param)
    return [{"params": body, "lr_mult": 1.0}, {"params": head, "lr_mult": float(head_lr_mult)}]
