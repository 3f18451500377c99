"""Benchmark the seconds to a tiny run's first training step, a fresh local Ray against ``raycv cluster up``'s warm
one, side by side in one run.

Each round runs the same command twice, as a user types it, in a new process: ``raycv train hotdog`` for 2 epochs on
the demo hotdog data at 64 px from scratch (160 images; README "Time to the first step"):

- **fresh**: no cluster up, so the command starts a local Ray of its own and stops it at the end;
- **warm**: after ``raycv cluster up`` (not timed; the machine is left idle for ``--settle`` seconds after it), the
  command joins that Ray; ``raycv cluster down`` follows, so the next fresh run has no idle Ray beside it.

The first step is the sum of the phases ``raycv train`` prints before ``training`` (start-up, checks, Ray, weights
and MLflow run, data pipelines, worker group to first step); wall is the command's own wall time. The MLflow store
is created before the first round, so no run pays for creating its schema. Rounds alternate the two, so a change in
load from other processes shows in both.

Usage: python benchmarks/bench_first_step.py [--rounds 1] [--settle 15]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TINY_RUN = ["train", "hotdog", "--epochs", "2", "--set", "model.weights=scratch", "--set", "augment.size=64",
            "--set", "augment.resize_size=72"]
#: The phases of `raycv train`'s seconds line after the first step.
AFTER_FIRST_STEP = ("training", "model registry")
SECONDS_LINE = re.compile(r"^seconds: (.*) \(total", re.MULTILINE)


def phases(output: str) -> dict[str, float]:
    """``raycv train``'s ``seconds: start-up 4.8, checks 0.0, ...`` line as {phase: seconds}."""
    [line] = SECONDS_LINE.findall(output)
    return {name: float(value) for name, value in (part.rsplit(" ", 1) for part in line.split(", "))}


def raycv(args: list[str], env: dict[str, str], cwd: Path) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run([str(BIN / "raycv"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"raycv {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr, wall


def timed_run(env: dict[str, str], work: Path, data_root: Path, tracking: str) -> dict[str, float]:
    output, wall = raycv([*TINY_RUN, "--data-root", str(data_root), "--tracking-uri", tracking], env, work)
    seconds = phases(output)
    first_step = sum(v for k, v in seconds.items() if k not in AFTER_FIRST_STEP)
    return {"first step": first_step, "wall": wall, "Ray": seconds["Ray"],
            "worker group": seconds["worker group to first step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="fresh + warm pairs to run")
    parser.add_argument("--settle", type=float, default=15.0, help="idle seconds after `raycv cluster up`")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from pipelines.data_commands import make_demo

    work = Path(tempfile.mkdtemp(prefix="raycv-first-step-"))
    data_root = work / "data"
    make_demo(data_root, only=["hotdog"])
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    MlflowClient(tracking).search_experiments()  # creates the store's schema
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    fresh_env = {**env, "RAYCV_CLUSTER_FILE": str(work / "no-cluster.json")}
    warm_env = {**env, "RAYCV_CLUSTER_FILE": str(work / "cluster.json")}

    rows: dict[str, list[dict[str, float]]] = {"fresh": [], "warm": []}
    for round_ in range(1, args.rounds + 1):
        rows["fresh"].append(timed_run(fresh_env, work, data_root, tracking))
        raycv(["cluster", "up"], warm_env, work)
        try:
            time.sleep(args.settle)
            rows["warm"].append(timed_run(warm_env, work, data_root, tracking))
        finally:
            raycv(["cluster", "down"], warm_env, work)
        print(f"round {round_}: " + "; ".join(f"{mode} " + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1].items())
                                               for mode, runs in rows.items()), flush=True)

    print(f"\nmedian of {args.rounds} round(s), seconds ({os.cpu_count()} CPUs)")
    print(f"{'local Ray':<10} {'first step':>10} {'wall':>7} {'Ray':>6} {'worker group':>13}")
    medians = {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for mode, runs in rows.items()}
    for mode, m in medians.items():
        print(f"{mode:<10} {m['first step']:>10.1f} {m['wall']:>7.1f} {m['Ray']:>6.1f} {m['worker group']:>13.1f}")
    fresh, warm = medians["fresh"], medians["warm"]
    print(f"\nwarm/fresh: first step {warm['first step'] / fresh['first step']:.2f}, wall "
          f"{warm['wall'] / fresh['wall']:.2f} (targets: first step <= 25 s, wall <= 40 s)")


if __name__ == "__main__":
    main()
