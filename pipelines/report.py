"""Console summaries for people: one table of runs and where to look at them in MLflow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipelines.tracking import run_url


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000   # then open http://127.0.0.1:5000"


def print_summary(runs: Sequence[tuple[str, Any]], tracking_uri: str, metric_key: str | None) -> None:
    """Print (label, TrainOutcome) pairs as a table plus the command that opens the MLflow UI."""
    from cvtasks.tasks import get_task

    rows = []
    for label, outcome in runs:
        key = metric_key or get_task(label.split()[0]).metric
        rows.append([label, outcome.run_id, key, outcome.metrics.get(key, float("nan")),
                     outcome.metrics.get("examples_per_sec", float("nan")), outcome.wall_seconds])
    print()
    print(format_table(["task", "mlflow run", "metric", "value", "examples/sec", "wall s"], rows))
    if len(runs) == 1:
        print(f"\nMLflow: {run_url(tracking_uri, runs[0][1].experiment_id, runs[0][1].run_id)}")
    print(f"MLflow UI: {ui_command(tracking_uri)}")


def seconds_line(phases: dict[str, float]) -> str:
    """Where a command's seconds went, in order: ``seconds: start-up 14.1, checks 2.0, Ray 9.9, ...``."""
    parts = ", ".join(f"{name} {value:.1f}" for name, value in phases.items())
    return f"seconds: {parts} (total {sum(phases.values()):.0f})"
