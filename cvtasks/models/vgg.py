"""VGG-19 feature extractor for neural style transfer (d2l 13.12), truncated after the last layer it reads.

Layer indices are those of torchvision's ``vgg19().features`` (0 = conv1_1, 5 = conv2_1, 10 = conv3_1,
19 = conv4_1, 25 = conv4_4, 28 = conv5_1; every conv is followed by its ReLU at index + 1), so torchvision
state dicts load unchanged.

Unlike torchvision (and d2l, which reads features out of it), the ReLUs here are not in place: with in-place
ReLUs the conv output recorded at index i is overwritten by the ReLU at i + 1, so d2l's "conv" features were
silently post-ReLU for every layer except the last. Here index i is the output of module i; post-ReLU features
are the odd indices after a conv (1, 6, 11, 20, 29).

Weights specs (never downloading):
    ``auto``      ``imagenet`` when its file is in the local torch hub cache, else ``random``
    ``imagenet``  ``VGG19_Weights.IMAGENET1K_V1`` from ``<torch.hub.get_dir()>/checkpoints/`` only; when that file
                  is absent the features fall back to random init and the description says so
    ``random``    torchvision's VGG initialisation under the caller's seed, each conv then rescaled so that its output
                  has standard deviation RANDOM_FEATURE_STD (see :func:`calibrate_random_features`); style transfer
                  then matches texture statistics of random filters only, so callers must report it loudly
    a file path   (or URI readable by :mod:`cvtasks.storage`) holding a state dict of ``vgg19`` or of its
                  ``features`` (or a checkpoint dict), read tensor-only by :func:`load_state_dict_file`: a pickled
                  module or any file that would run code is refused
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchvision.models import VGG19_Weights

from cvtasks import storage
from cvtasks.errors import DataFormatError
from cvtasks.models.weights import StateDict, imagenet_cache_file, load_backbone_state, load_state_dict_file

log = logging.getLogger(__name__)

AUTO = "auto"
IMAGENET = "imagenet"
RANDOM = "random"
#: Output channels of VGG-19's 16 convs with "M" for its 2x2 max-pools (torchvision's configuration "E").
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
CONV_KERNEL = 3
POOL_SIZE = 2
NUM_FEATURE_LAYERS = len(VGG19_LAYOUT) * 2 - VGG19_LAYOUT.count("M")  # conv + ReLU per conv, one module per pool
RGB_CHANNELS = 3
#: d2l's choice: the first conv of each of the five blocks for style, conv4_4 for content.
DEFAULT_STYLE_LAYERS = (0, 5, 10, 19, 28)
DEFAULT_CONTENT_LAYERS = (25,)
#: Key prefixes a saved state dict may put before the feature layers' own keys ("0.weight"): torchvision's full
#: ``vgg19`` ("features."), a DDP wrapper ("module."), or both.
KEY_PREFIXES = ("", "features.", "module.", "module.features.")
RANDOM_INIT_NOTE = "results show texture statistics only"
#: Side of the Gaussian-noise image random features are calibrated on: 4x4 px are left after VGG's 4 pools.
CALIBRATION_SIDE = 64
#: Standard deviation of every random conv's output after calibration; measured choice, see calibrate_random_features.
RANDOM_FEATURE_STD = 5.0


def random_init_description(reason: str) -> str:
    return f"random-init VGG-19 features ({reason}): {RANDOM_INIT_NOTE}"


def vgg19_feature_layers(count: int = NUM_FEATURE_LAYERS) -> list[nn.Module]:
    """The first ``count`` of the 37 modules of torchvision's ``vgg19().features``, with non-in-place ReLUs and
    torchvision's initialisation (drawn from torch's global RNG)."""
    layers: list[nn.Module] = []
    in_channels = RGB_CHANNELS
    for item in VGG19_LAYOUT:
        if len(layers) >= count:
            break
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=POOL_SIZE, stride=POOL_SIZE))
            continue
        conv = nn.Conv2d(in_channels, int(item), kernel_size=CONV_KERNEL, padding=CONV_KERNEL // 2)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's VGG.__init__
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=False)]
        in_channels = int(item)
    return layers[:count]


@torch.no_grad()
def calibrate_random_features(layers: nn.Sequential, std: float = RANDOM_FEATURE_STD,
                              side: int = CALIBRATION_SIDE) -> None:
    """Rescale each randomly initialised conv, layer by layer, so that its output has standard deviation ``std`` on
    a standard-normal (1, 3, side, side) image drawn from torch's global RNG (as LSUV, Mishkin & Matas 2016, does
    for unit variance).

    Why: the book's loss weights suit the feature magnitudes of ImageNet-trained VGG. With torchvision's random init
    the features shrink with depth, the normalised Gram matrices come out ~1e4 times too small and the TV term
    (weight 10) swamps the style term: the image only blurs (measured at 64x96: weighted style 0.001 vs TV 1.5 at
    step 1; raw style rose during 300 steps). Calibrated features fix the depth profile; their scale then sets how
    content and style weigh against TV. Measured on the demo pairs at 96x144, 150 steps: std 1 lets TV smooth the
    content away (unrecognisable blobs), std 3 keeps the content with a little texture, std 5 keeps the content
    and carries the style's colours and texture (style loss 2200-2400x lower).
    """
    x = torch.randn(1, RGB_CHANNELS, side, side)
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            scale = layer(x).std() / std
            layer.weight /= scale
            layer.bias /= scale
        x = layer(x)


class VGGFeatures(nn.Module):
    """Frozen VGG-19 ``features`` truncated after ``max(style_layers + content_layers)``; without a state dict,
    calibrated random features (drawn from torch's global RNG: seed it).

    ``extract(x)`` maps (N, 3, H, W) ImageNet-normalised images to ``(contents, styles)``: lists of feature maps
    (N, C_l, H_l, W_l), one per entry of ``content_layers`` / ``style_layers`` in the order given.
    ``weights_description`` says where the weights came from; ``pretrained`` is False for random init.
    """

    def __init__(self, style_layers: tuple[int, ...] = DEFAULT_STYLE_LAYERS,
                 content_layers: tuple[int, ...] = DEFAULT_CONTENT_LAYERS, state_dict: StateDict | None = None,
                 weights_description: str = "") -> None:
        super().__init__()
        wanted = list(style_layers) + list(content_layers)
        if not style_layers or not content_layers:
            raise ValueError(f"style transfer needs style and content layers, got {style_layers} / {content_layers}")
        if min(wanted) < 0 or max(wanted) >= NUM_FEATURE_LAYERS:
            raise ValueError(f"VGG-19 feature layers are 0..{NUM_FEATURE_LAYERS - 1}, got {sorted(wanted)}")
        self.style_layers = tuple(style_layers)
        self.content_layers = tuple(content_layers)
        self.layers = nn.Sequential(*vgg19_feature_layers(max(wanted) + 1))
        self.pretrained = state_dict is not None
        self.weights_description = weights_description or random_init_description("no state dict given")
        if state_dict is not None:
            load_feature_state(self.layers, state_dict, weights_description)
        else:
            calibrate_random_features(self.layers)
        self.requires_grad_(False)
        self.eval()

    def extract(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(N, 3, H, W) -> (content feature maps, style feature maps); layers after 4 pools need H, W >= 16."""
        wanted = set(self.content_layers + self.style_layers)
        outputs: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in wanted:
                outputs[index] = x
        return [outputs[i] for i in self.content_layers], [outputs[i] for i in self.style_layers]


def load_feature_state(layers: nn.Sequential, state_dict: StateDict, source: str) -> None:
    """Copy the weights of the (possibly truncated) feature ``layers`` out of a ``vgg19`` or ``features`` state dict.

    Keys beyond the truncation (deeper convs, the classifier) are ignored; a missing key or another shape raises
    ``ValueError`` naming ``source``.
    """
    load_backbone_state(layers, state_dict, source, skip_prefix=None, prefixes=KEY_PREFIXES,
                        what="VGG-19's features")


def resolve_vgg_weights(spec: str = AUTO) -> tuple[StateDict | None, str]:
    """(state dict, or None for random init; a one-line description of the weights' origin).

    See the module docstring for the specs. Random init is never silent: its description starts with
    "random-init" and names why (and, for ``auto``/``imagenet``, the cache file that was looked for).
    """
    if spec == RANDOM:
        return None, random_init_description("style.weights=random")
    if spec in (AUTO, IMAGENET):
        entry = VGG19_Weights.IMAGENET1K_V1
        cache = imagenet_cache_file(entry)
        if cache.is_file():
            return load_state_dict_file(str(cache)), f"imagenet: VGG19_Weights.{entry.name} ({cache})"
        return None, random_init_description(f"style.weights={spec}, no pretrained weights found: {cache} is missing; "
                                             f"copy {entry.url} there for real style transfer")
    if not storage.exists(spec):
        raise DataFormatError(spec, f"no such weights file (style.weights must be {AUTO}, {IMAGENET}, {RANDOM} "
                                    "or a state-dict file)")
    return load_state_dict_file(spec), f"file: {spec}"


def build_vgg_features(spec: str = AUTO, style_layers: tuple[int, ...] = DEFAULT_STYLE_LAYERS,
                       content_layers: tuple[int, ...] = DEFAULT_CONTENT_LAYERS) -> VGGFeatures:
    """A frozen extractor with the weights ``spec`` names; random init draws from torch's global RNG (seed it)."""
    state_dict, description = resolve_vgg_weights(spec)
    extractor = VGGFeatures(style_layers, content_layers, state_dict, description)
    if extractor.pretrained:
        log.info("VGG-19 features: %s", description)
    else:
        log.warning("VGG-19 features: %s", description)
    return extractor
