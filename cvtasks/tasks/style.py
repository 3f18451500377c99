"""Neural style transfer with VGG-19 features (d2l 13.12), declared as a task like the others.

It optimises one image per content/style pair instead of training a model over a dataset, so its runner is
"stylize" (pipelines/style.py: one Ray task per pair; Tune sweeps the loss weights) rather than Ray Train. The
optimisation itself is :mod:`cvtasks.style`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cvtasks.catalog import DemoStep, Workload
from cvtasks.settings import OptimSection, Section


@dataclass(frozen=True)
class StyleSection(Section):
    pairs: list[list[str]]  # [content, style] image specs: files, URIs or skimage:<name>
    size: list[int]  # [h, w] of the synthesised image
    steps: int
    log_every: int
    weights: str  # auto | imagenet | random | a file
    style_layers: list[int]
    content_layers: list[int]


@dataclass(frozen=True)
class StyleLoss(Section):
    content_weight: float
    style_weight: float
    tv_weight: float
    ref_content_weight: float
    ref_style_weight: float
    ref_tv_weight: float


@dataclass(frozen=True)
class StyleOptim(OptimSection):
    lr_step: int = 50  # StepLR: multiply the lr by lr_gamma every lr_step steps
    lr_gamma: float = 0.8


class StyleTask(Workload):
    name = "style"
    runner = "stylize"
    #: unweighted losses under the fixed ``loss.ref_*`` weights: comparable across trials of different weights
    metric = "ref_loss"
    metric_mode = "min"
    sections = {"style": StyleSection, "loss": StyleLoss, "optim": StyleOptim}
    # 3 pairs x 0.66 CPU: all three at once on 2 cores (one thread each) rather than two and then one.
    demo_steps = (DemoStep("style", "style", ("style.steps=150", "style.size=[96, 144]", "style.log_every=50",
                                              "scaling.cpus_per_worker=0.66")),)
