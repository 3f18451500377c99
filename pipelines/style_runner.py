"""The "stylize" runner: tasks that optimise one image per content/style pair (neural style transfer) instead of
training a model with Ray Train. ``raycv train TASK``, ``raycv stylize``, the demo and Tune reach
:mod:`pipelines.style` through it; it imports that module (torch, Ray) only when used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cvtasks.settings import TaskConfig
from pipelines.config import ConfigError
from pipelines.runners import OUTPUT_DIR, DemoRow, RunRequest

if TYPE_CHECKING:
    from pipelines.sweep_plan import SweepPlan


def stylize(cfg: TaskConfig, tracking_uri: str, address: str | None, output_dir: str | Path) -> int:
    """Run the config's pairs as parallel Ray tasks and print where the results are; 1 if a pair failed."""
    from pipelines.cluster import connect
    from pipelines.style import load_pairs, run_pairs, summary

    inputs = load_pairs(cfg)  # opens every image on the driver: a bad one fails before Ray starts
    connect(address)
    outcomes = run_pairs(cfg, inputs, tracking_uri, output_dir)
    print(summary(outcomes, cfg.task, tracking_uri))
    return 1 if any(o.error for o in outcomes) else 0


class StyleRunner:
    def preflight(self, cfg: TaskConfig, tracking_uri: str) -> None:
        from pipelines.style import load_pairs

        load_pairs(cfg)

    def train(self, cfg: TaskConfig, request: RunRequest) -> int:
        if request.resume or request.epochs_given:
            raise ConfigError(f"{cfg.task} optimises images: it has no epochs or checkpoints (use --set "
                              "style.steps=N, or raycv stylize)")
        return stylize(cfg, request.tracking_uri, request.address, Path(request.output_dir) / cfg.task)

    def demo(self, step: str, cfg: TaskConfig, tracking_uri: str) -> DemoRow:
        """All configured pairs in parallel; the row reports the first pair (with the others' count)."""
        from pipelines.style import load_pairs, run_pairs

        outcomes = run_pairs(cfg, load_pairs(cfg), tracking_uri, Path(OUTPUT_DIR) / cfg.task)
        failed = [o for o in outcomes if o.error]
        if failed:
            raise RuntimeError(f"style transfer failed for {failed[0].content} + {failed[0].style}: "
                               f"{failed[0].error}")
        first = outcomes[0]
        return DemoRow(f"{step} ({len(outcomes)} pairs)", first.run_id, first.experiment_id, "style_reduction",
                       first.metrics.get("style_reduction", float("nan")), float("nan"),
                       max(o.wall_seconds for o in outcomes))

    def sweep_plan(self, cfg: TaskConfig) -> SweepPlan:
        from pipelines.style import sweep_plan

        return sweep_plan(cfg)
