"""The table of ``benchmarks/gpu.sh``: each task's examples/sec read back from the runs' MLflow store, next to the
examples/sec that *Dive into Deep Learning* prints for the same workload.

A training run's figure is its last epoch's ``examples_per_sec`` (training pass only, as the loop reports it:
steady state, after the first epoch's warm-up of cuDNN and the data pipeline, shown apart); style transfer reports
optimisation steps/sec per content/style pair (``step`` over ``wall_seconds``), which the book does not measure.

The book's figures are its printed ``examples/sec`` on its own GPUs; CIFAR-10's was measured on 2 GPUs, so it is
compared per GPU (half of it). raycv's runs here use demo-size datasets (epochs of a few hundred to a few thousand
images) with the book's per-example work (image sizes, model widths, batch sizes): a short epoch's figure includes
more start-up per step than the book's full-size epochs.

Usage: python benchmarks/gpu_report.py --tracking-uri URI --status FILE [--out FILE] [--device TEXT] [--dry-run]
(``--status``: lines ``name<TAB>status<TAB>seconds`` that gpu.sh writes for each command.)
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.report import format_table
from pipelines.tracking import experiment_name

EXAMPLES_KEY = "examples_per_sec"


@dataclass(frozen=True)
class Book:
    """d2l's printed examples/sec for a workload, on ``gpus`` GPUs."""

    examples_per_sec: float
    gpus: int
    workload: str

    @property
    def per_gpu(self) -> float:
        return self.examples_per_sec / self.gpus


#: What gpu.sh trains, in its order, with the book's figure for it.
BOOK: dict[str, Book] = {
    "cifar10": Book(4729.0, 2, "d2l 13.1: ResNet-18 (width 64), 32 px, batch 256"),
    "hotdog": Book(1062.0, 1, "d2l 13.2: torchvision ResNet-18, 224 px, batch 128"),
    "banana": Book(4280.0, 1, "d2l 13.7: TinySSD, 256 px, batch 32"),
    "voc": Book(227.0, 1, "d2l 13.11: FCN on ResNet-18, 320x480 crops, batch 32"),
}


@dataclass
class Measured:
    name: str
    value: float = math.nan  # examples/sec of the last epoch (style: mean steps/sec over pairs)
    first: float = math.nan  # examples/sec of the first epoch
    epochs: int = 0
    run: str = ""
    note: str = ""


def latest_run(client: MlflowClient, task: str):
    experiment = client.get_experiment_by_name(experiment_name(task))
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def measure_training(client: MlflowClient, task: str) -> Measured:
    out = Measured(task)
    run = latest_run(client, task)
    if run is None:
        out.note = "no MLflow run"
        return out
    history = sorted(client.get_metric_history(run.info.run_id, EXAMPLES_KEY), key=lambda m: m.step)
    out.run, out.epochs = run.info.run_id[:8], len(history)
    if history:
        out.first, out.value = history[0].value, history[-1].value
    out.note = run.info.status.lower()
    return out


def measure_style(client: MlflowClient) -> Measured:
    out = Measured("style")
    experiment = client.get_experiment_by_name(experiment_name("style"))
    runs = client.search_runs([experiment.experiment_id], "tags.`raycv.kind` = 'stylize'") if experiment else []
    rates = []
    for run in runs:
        steps, seconds = run.data.params.get("style.steps"), run.data.metrics.get("wall_seconds")
        if run.info.status == "FINISHED" and steps and seconds:
            rates.append(int(steps) / seconds)
    if not runs:
        out.note = "no MLflow run"
    else:
        out.note = f"mean of {len(rates)} of {len(runs)} pairs (one at a time, fp32, incl. image logging)"
        if rates:
            out.value = statistics.fmean(rates)
    return out


def read_status(path: Path) -> dict[str, str]:
    statuses = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds = (line.split("\t") + ["", ""])[:3]
        statuses[name] = f"{status} {seconds} s".strip()
    return statuses


def rows(client: MlflowClient, statuses: dict[str, str]) -> tuple[list[str], list[list[object]]]:
    headers = ["task", "raycv ex/s (last epoch)", "first epoch", "epochs", "d2l ex/s", "d2l per GPU",
               "raycv / d2l per GPU", "command", "run"]
    table = []
    for task, book in BOOK.items():
        m = measure_training(client, task)
        ratio = m.value / book.per_gpu if not math.isnan(m.value) else math.nan
        table.append([task, m.value, m.first, m.epochs, f"{book.examples_per_sec:,.0f} on {book.gpus} GPU"
                      f"{'s' if book.gpus > 1 else ''}", f"{book.per_gpu:,.0f}", ratio,
                      statuses.get(task, "not run"), f"{m.run} ({m.note})" if m.run else m.note])
    style = measure_style(client)
    table.append(["style (steps/sec)", style.value, "", "", "n/a", "n/a", "", statuses.get("style", "not run"),
                  style.note])
    return headers, table


def cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}" if value < 100 else f"{value:,.0f}"
    return str(value)


def markdown(headers: list[str], table: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="the MLflow store gpu.sh's runs wrote to")
    parser.add_argument("--status", type=Path, required=True, help="gpu.sh's per-command status file")
    parser.add_argument("--out", type=Path, help="also write the table, as Markdown, to this file")
    parser.add_argument("--device", default="", help="what the runs ran on, for the file's header")
    parser.add_argument("--settings", default="", help="the runs' settings, for the file's header")
    parser.add_argument("--dry-run", action="store_true", help="a CPU dry run: the figures are not GPU figures")
    args = parser.parse_args(argv)
    headers, table = rows(MlflowClient(args.tracking_uri), read_status(args.status))
    print(format_table(headers, [[cell(v) for v in row] for row in table]))
    if args.out:
        kind = "CPU dry run (RAYCV_GPU_DRY_RUN=1): not GPU figures" if args.dry_run else "GPU run"
        text = [f"# benchmarks/gpu.sh: {kind}", "", f"Device: {args.device or 'not recorded'}.",
                f"Settings: {args.settings or 'not recorded'}.", "",
                "Demo-size datasets with the book's per-example work (image sizes, widths, batch sizes): "
                "examples/sec of short demo epochs, not the book's full-size runs. d2l's figures: "
                + "; ".join(f"{task} {b.workload}" for task, b in BOOK.items()) + ".", "",
                markdown(headers, table), ""]
        args.out.write_text("\n".join(text))
        print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
