"""A small Faster R-CNN (d2l 13.8) for CPU training at 128 px: torchvision's ``FasterRCNN`` on a ResNet-18 FPN.

Why ResNet-18 FPN rather than ``fasterrcnn_mobilenet_v3_large_320_fpn``: the MobileNet model is tuned for 320 px
inputs upscaled from larger photos (its two feature maps have strides 16 and 32, i.e. 8x8 and 4x4 cells at 128 px,
too coarse for demo bananas a tenth to a fifth of the image wide) and for ImageNet weights behind frozen batch norm
(not measured here against this model). ResNet-18's ``layer2``-``layer4`` give strides 8, 16 and 32 (16x16 down to
4x4 at 128 px), plain convolutions with trainable batch norm learn from scratch (on the demo data the RPN's proposals
find the bananas in an epoch; the box head takes longer, see README), and its weights are the ones raycv already
resolves (``model.weights=imagenet`` is torchvision's ResNet-18, a hotdog run's model is a
ResNet-18). The FPN and box head are narrowed (``fpn_channels``, ``representation``) from torchvision's 256 / 1024,
which would cost most of the compute at this input size.

Every size is in input pixels: ``min_size`` = ``max_size`` = the augmented size keeps torchvision's transform from
resizing the 128 px batches, and the anchors (one size per FPN level, smallest on the finest map) fit objects of
16-128 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from cvtasks.models import weights as W
from cvtasks.settings import Section

if TYPE_CHECKING:
    from cvtasks.detection import DetectSettings

#: ResNet-18 stages that feed the FPN (strides 8, 16, 32) and their channels; the FPN adds a max-pooled level.
RESNET_LAYERS = ("layer2", "layer3", "layer4")
RESNET_CHANNELS = (128, 256, 512)
#: Side of the RoI Align grid each proposal is pooled to (torchvision's default).
ROI_GRID = 7


@dataclass(frozen=True)
class FasterRCNNSettings(Section):
    """The ``model.fasterrcnn`` section (see banana.yaml for each value's meaning and torchvision's default)."""

    fpn_channels: int
    representation: int
    anchor_sizes: list[int]
    aspect_ratios: list[float]
    min_size: int
    max_size: int
    rpn_pre_nms_top_n: int
    rpn_post_nms_top_n: int
    rpn_batch_size_per_image: int
    box_batch_size_per_image: int


def resnet18_fpn(fpn_channels: int) -> BackboneWithFPN:
    """ResNet-18 (trainable batch norm, no pretrained weights) -> FPN maps "0", "1", "2" and "pool"."""
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    return BackboneWithFPN(body, return_layers={name: str(i) for i, name in enumerate(RESNET_LAYERS)},
                           in_channels_list=list(RESNET_CHANNELS), out_channels=fpn_channels,
                           extra_blocks=LastLevelMaxPool())


def build_fasterrcnn(num_classes: int, settings: FasterRCNNSettings, detect: DetectSettings,
                     weights_spec: str = W.SCRATCH) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` object classes (plus background, label 0).

    ``settings``: the config's ``model.fasterrcnn`` section; ``detect``: its ``detect`` section (NMS threshold,
    lowest kept confidence and detections per image, shared with TinySSD). ``weights_spec`` as ``model.weights``
    (see :func:`load_weights`).
    """
    sizes = settings.anchor_sizes
    levels = len(RESNET_LAYERS) + 1
    if len(sizes) != levels:
        raise ValueError(f"model.fasterrcnn.anchor_sizes needs {levels} sizes (one per FPN level), got {sizes}")
    fpn_channels, representation = settings.fpn_channels, settings.representation
    ratios = tuple(settings.aspect_ratios)
    pre_nms, post_nms = settings.rpn_pre_nms_top_n, settings.rpn_post_nms_top_n
    model = FasterRCNN(
        resnet18_fpn(fpn_channels), num_classes=None,
        min_size=settings.min_size, max_size=settings.max_size,
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * levels),
        # The same proposal counts in training and evaluation: an evaluation pass computes its losses and its
        # detections from one set of proposals (cvtasks.two_stage.forward).
        rpn_pre_nms_top_n_train=pre_nms, rpn_pre_nms_top_n_test=pre_nms,
        rpn_post_nms_top_n_train=post_nms, rpn_post_nms_top_n_test=post_nms,
        rpn_batch_size_per_image=settings.rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign([str(i) for i in range(len(RESNET_LAYERS))], ROI_GRID, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * ROI_GRID**2, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes + 1),
        box_batch_size_per_image=settings.box_batch_size_per_image,
        box_score_thresh=detect.pos_threshold, box_nms_thresh=detect.nms_threshold,
        box_detections_per_img=detect.max_candidates,
    )
    model.weights_description = load_weights(model, weights_spec)
    return model


def load_weights(model: FasterRCNN, spec: str) -> str:
    """Fill ``model`` from a ``model.weights`` spec; returns a description of what was loaded.

    A state dict with every key of the detector (an earlier raycv Faster R-CNN run) fills all of it; anything else
    is ResNet-18 weights for the backbone's body (``imagenet``, a ResNet-18 file, a hotdog run), the FPN and heads
    keeping their random initialisation.
    """
    state_dict, description = W.resolve_state_dict(spec, ResNet18_Weights)
    if state_dict is None:
        return description
    if all(key in state_dict for key in model.state_dict()):
        model.load_state_dict({key: state_dict[key] for key in model.state_dict()})
        return description
    W.load_backbone_state(model.backbone.body, state_dict, description)
    return f"{description} (backbone)"

