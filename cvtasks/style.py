"""Neural style transfer (d2l 13.12): optimise one image so that its VGG-19 features keep the content image's
content and take on the style image's Gram-matrix statistics.

Tensors: images are (1, 3, H, W) float32, ImageNet-normalised (see :func:`preprocess`); feature maps are
(N, C, H_l, W_l); Gram matrices (N, C, C). The synthesised image, initialised to the content image, is the only
trained parameter; the VGG-19 extractor is frozen (:mod:`cvtasks.models.vgg`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import skimage.data
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.optim.lr_scheduler import StepLR

from cvtasks import pictures, storage
from cvtasks.errors import DataFormatError
from cvtasks.images import check_rgb_convertible, decode_image, to_8bit
from cvtasks.models.vgg import AUTO, DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS, VGGFeatures, build_vgg_features
from cvtasks.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

#: VGG-19 halves an image 4 times before conv5_1 (style layer 28): 32 px leaves it a 2x2 map.
MIN_IMAGE_SIDE = 32
#: Transparent pixels are shown over white, as an image viewer would, not over whatever colour they hide.
ALPHA_BACKGROUND = (255, 255, 255)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
MAX_8BIT = 255
#: Prefix of a config image spec naming a picture bundled with scikit-image (no download) instead of a file.
DEMO_PREFIX = "skimage:"
#: scikit-image pictures available offline: photos for content, textures (grayscale ones too) for style.
DEMO_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "brick", "grass", "gravel", "immunohistochemistry",
               "hubble_deep_field", "colorwheel")
#: (content, style) pairs of the demo: a colour stain texture, a grayscale brick wall, a star field.
DEMO_PAIRS = (("chelsea", "immunohistochemistry"), ("astronaut", "brick"), ("coffee", "hubble_deep_field"))
CONTACT_SHEET_COLUMNS = 4


# ----------------------------------------------------------------------------------------------- image input/output

def to_rgb(img: Image.Image, source: object) -> Image.Image:
    """An RGB copy of ``img``: grayscale, palette, 16-bit grayscale and CMYK are converted; transparency (alpha
    channel or a palette's transparent index) is composited over white. ``source`` names the image in errors;
    a mode without an RGB meaning (float "F") raises :class:`DataFormatError`."""
    img = to_8bit(img)
    check_rgb_convertible(img, source)
    try:
        if img.mode in ALPHA_MODES or "transparency" in img.info:
            background = Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, MAX_8BIT))
            return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DataFormatError(source, f"cannot convert a {img.mode} image to RGB ({exc})") from exc


def check_image_size(img: Image.Image, source: object) -> None:
    """Raise :class:`DataFormatError` (a ``ValueError``) naming ``source`` when a side is under MIN_IMAGE_SIDE."""
    width, height = img.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise DataFormatError(source, f"image is {width}x{height} px (width x height); style transfer needs at least "
                                      f"{MIN_IMAGE_SIDE} px per side (VGG-19 pools it 4 times before conv5_1)")


def load_image(path: str) -> Image.Image:
    """The RGB image in file ``path`` (local path or URI readable by :mod:`cvtasks.storage`).

    A missing file, a file that is not an image (empty, truncated, a decompression bomb), an image mode without an
    RGB meaning and an image under MIN_IMAGE_SIDE px on a side raise :class:`DataFormatError` naming ``path``.
    """
    img = decode_image(storage.read_bytes(path), path)
    check_image_size(img, path)
    return to_rgb(img, path)


def demo_image(name: str) -> Image.Image:
    """A scikit-image picture (see DEMO_IMAGES) as RGB; grayscale textures are converted."""
    if name not in DEMO_IMAGES:
        raise ValueError(f'unknown demo image "{name}"; available: {", ".join(DEMO_IMAGES)}')
    return to_rgb(Image.fromarray(getattr(skimage.data, name)()), f"skimage.data.{name}()")


def open_image(spec: str) -> Image.Image:
    """``skimage:<name>`` -> :func:`demo_image`; anything else is a file for :func:`load_image`."""
    if spec.startswith(DEMO_PREFIX):
        return demo_image(spec[len(DEMO_PREFIX):])
    return load_image(spec)


def demo_specs() -> list[tuple[str, str]]:
    """DEMO_PAIRS as (content, style) image specs for :func:`open_image`."""
    return [(DEMO_PREFIX + content, DEMO_PREFIX + style) for content, style in DEMO_PAIRS]


def preprocess(img: Image.Image, size: Sequence[int]) -> torch.Tensor:
    """PIL image -> (1, 3, h, w) float32 ImageNet-normalised tensor, resized (bilinear, antialiased) to
    ``size = (h, w)`` without keeping the aspect ratio, as d2l."""
    rgb = img if img.mode == "RGB" else to_rgb(img, "image passed to preprocess")
    resized = TF.resize(rgb, [int(size[0]), int(size[1])], interpolation=TF.InterpolationMode.BILINEAR,
                        antialias=True)
    return TF.normalize(TF.to_tensor(resized), IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0)


def postprocess(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) ImageNet-normalised tensor (any device) -> RGB PIL image, clamped to [0, 1]."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"postprocess takes one image, got a batch of shape {tuple(x.shape)}")
        x = x[0]
    return Image.fromarray(pictures.denormalize(x[None])[0])


# ------------------------------------------------------------------------------------------------------------ losses

def gram(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) feature maps -> (N, C, C) Gram matrices normalised by C * H * W (d2l), so that layers of
    different sizes weigh alike: ``G[n, i, j] = sum_p x[n, i, p] * x[n, j, p] / (C * H * W)``."""
    n, channels, height, width = x.shape
    flat = x.reshape(n, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


def content_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error between synthesised and content feature maps (same shape)."""
    return torch.square(y_hat - y.detach()).mean()


def style_loss(y_hat: torch.Tensor, gram_y: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the Gram matrix of feature maps ``y_hat`` and the style's Gram matrix."""
    return torch.square(gram(y_hat) - gram_y.detach()).mean()


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Total variation of (N, C, H, W) images: 0.5 * (mean |vertical neighbour diff| + mean |horizontal diff|)."""
    vertical = torch.abs(x[:, :, 1:, :] - x[:, :, :-1, :]).mean()
    horizontal = torch.abs(x[:, :, :, 1:] - x[:, :, :, :-1]).mean()
    return 0.5 * (vertical + horizontal)


@dataclass(frozen=True)
class LossWeights:
    """Explicit weights of the three terms. d2l prints style 1e3 but its ``10 * styles_l`` repeats a Python list
    ten times (erratum 6), so its effective style weight is 1e4: that is the default here, written out."""

    content: float = 1.0
    style: float = 1e4
    tv: float = 10.0

    def weigh(self, terms: Mapping[str, Any]) -> dict[str, Any]:
        """Unweighted ``{"content", "style", "tv"}`` terms (tensors or floats) -> the same terms times their weight."""
        return {"content": self.content * terms["content"], "style": self.style * terms["style"],
                "tv": self.tv * terms["tv"]}

    def total(self, terms: Mapping[str, Any]) -> Any:
        """The weighted sum of unweighted ``terms``: the objective these weights define."""
        return sum(self.weigh(terms).values())


def loss_terms(image: torch.Tensor, contents: Sequence[torch.Tensor], styles: Sequence[torch.Tensor],
               content_targets: Sequence[torch.Tensor], style_grams: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unweighted ``{"content", "style", "tv"}``, content and style each summed over their layers. ``image``
    (1, 3, H, W) is the synthesised image; ``contents`` / ``styles`` are its feature maps."""
    return {
        "content": sum(content_loss(y, t) for y, t in zip(contents, content_targets, strict=True)),
        "style": sum(style_loss(y, g) for y, g in zip(styles, style_grams, strict=True)),
        "tv": tv_loss(image),
    }


# ------------------------------------------------------------------------------------------------------ optimisation

@dataclass(frozen=True)
class StyleConfig:
    """Settings of one style transfer; :meth:`from_config` reads them from the task config's sections."""

    size: tuple[int, int] = (300, 450)  # (h, w) of the synthesised image (d2l)
    steps: int = 500
    log_every: int = 50
    weights: str = AUTO
    style_layers: tuple[int, ...] = DEFAULT_STYLE_LAYERS
    content_layers: tuple[int, ...] = DEFAULT_CONTENT_LAYERS
    loss: LossWeights = field(default_factory=LossWeights)
    #: Fixed weights that score a result independently of the weights it was optimised with (sweeps compare
    #: trials by ``reference.total(terms)``; each trial's own total is on its own scale).
    reference: LossWeights = field(default_factory=LossWeights)
    lr: float = 0.3
    lr_step: int = 50
    lr_gamma: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < MIN_IMAGE_SIDE:
            raise ValueError(f"style.size must be [h, w] with sides >= {MIN_IMAGE_SIDE}, got {list(self.size)}")
        if self.steps < 1 or self.log_every < 1 or self.lr_step < 1:
            raise ValueError(f"style.steps, style.log_every and optim.lr_step must be >= 1, got "
                             f"{self.steps}, {self.log_every}, {self.lr_step}")
        if self.lr <= 0 or not 0 < self.lr_gamma <= 1:
            raise ValueError(f"optim.lr must be > 0 and optim.lr_gamma in (0, 1], got {self.lr}, {self.lr_gamma}")
        for weights in (self.loss, self.reference):
            if min(weights.content, weights.style, weights.tv) < 0:
                raise ValueError(f"loss weights must be >= 0, got {weights}")

    @classmethod
    def from_config(cls, cfg: Any) -> StyleConfig:
        """The settings of the style task's typed config (``style``, ``optim``, ``loss`` sections and
        ``train.seed``; see pipelines/configs/style.yaml)."""
        style, optim, loss = cfg.style, cfg.optim, cfg.loss
        if optim.name != "adam":
            raise ValueError(f'style transfer optimises with adam only, got optim.name "{optim.name}"')
        return cls(
            size=tuple(style.size), steps=style.steps, log_every=style.log_every, weights=style.weights,
            style_layers=tuple(style.style_layers), content_layers=tuple(style.content_layers),
            loss=LossWeights(loss.content_weight, loss.style_weight, loss.tv_weight),
            reference=LossWeights(loss.ref_content_weight, loss.ref_style_weight, loss.ref_tv_weight),
            lr=optim.lr, lr_step=optim.lr_step, lr_gamma=optim.lr_gamma, seed=cfg.train.seed,
        )


@dataclass
class StepResult:
    """One optimisation step, its losses evaluated on the image the step started from.

    ``terms``: unweighted "content", "style", "tv"; ``losses``: the same times ``cfg.loss`` plus their sum "total"
    (what the step minimised). ``image`` is the image after the step, set every ``log_every`` steps and on the last.
    """

    step: int  # 1-based
    terms: dict[str, float]
    losses: dict[str, float]
    lr: float  # learning rate the step used
    image: Image.Image | None


def seeded_extractor(cfg: StyleConfig) -> VGGFeatures:
    """The extractor ``cfg.weights`` names; random init drawn under ``cfg.seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_vgg_features(cfg.weights, cfg.style_layers, cfg.content_layers)


def stylize(content_img: Image.Image, style_img: Image.Image, cfg: StyleConfig,
            device: str | torch.device = "cpu", extractor: VGGFeatures | None = None) -> Iterator[StepResult]:
    """Yield one :class:`StepResult` per step of Adam + StepLR on the synthesised image (d2l 13.12's ``train``).

    Both images are resized to ``cfg.size``; the synthesised image starts as the content image. ``extractor``
    defaults to :func:`seeded_extractor` (pass one in to reuse it across runs; it is moved to ``device``; its layers
    are used, not ``cfg``'s). Deterministic for a seed on CPU. A non-finite loss raises ``FloatingPointError``.
    """
    device = torch.device(device)
    extractor = (seeded_extractor(cfg) if extractor is None else extractor).to(device)
    content_x = preprocess(content_img, cfg.size).to(device)
    with torch.no_grad():
        content_targets, _ = extractor.extract(content_x)
        _, style_features = extractor.extract(preprocess(style_img, cfg.size).to(device))
        style_grams = [gram(y) for y in style_features]
    image = nn.Parameter(content_x.clone())
    optimizer = torch.optim.Adam([image], lr=cfg.lr)
    scheduler = StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    for step in range(1, cfg.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        contents, styles = extractor.extract(image)
        terms = loss_terms(image, contents, styles, content_targets, style_grams)
        parts = cfg.loss.weigh(terms)
        total = sum(parts.values())
        total.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        losses = {name: value.item() for name, value in parts.items()} | {"total": total.item()}
        if not np.isfinite(losses["total"]):
            raise FloatingPointError(f"style transfer loss became {losses} at step {step} (lr {lr}, {cfg.loss})")
        show = step % cfg.log_every == 0 or step == cfg.steps
        yield StepResult(step, {name: value.item() for name, value in terms.items()}, losses, lr,
                         postprocess(image) if show else None)


def contact_sheet(images: Sequence[Image.Image], captions: Sequence[Sequence[str]],
                  columns: int = CONTACT_SHEET_COLUMNS) -> Image.Image:
    """Results side by side, ``columns`` per row, each over its caption lines (e.g. the weights it was made with)."""
    tiles = [pictures.captioned_tile(np.asarray(img.convert("RGB")), [(line, pictures.TEXT_COLOUR) for line in caption])
             for img, caption in zip(images, captions, strict=True)]
    return pictures.grid(tiles, columns)
