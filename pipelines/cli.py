"""``raycv`` command line: data preparation, training, sweeps, prediction, style transfer, the demo."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from cvtasks.errors import DataFormatError
from cvtasks.settings import TaskConfig
from cvtasks.tasks import task_names
from pipelines import logs
from pipelines.config import ConfigError, file_sets, load_config
from pipelines.download import DownloadError
from pipelines.failures import RunError
from pipelines.interrupts import RunInterrupted, stop_signals_raise
from pipelines.progress import console_style
from pipelines.runners import OUTPUT_DIR

#: Errors that say what is wrong with the user's input or setup: printed as one line, exit status 2.
USER_ERRORS = (ConfigError, DataFormatError, DownloadError, RunError, ValueError, FileNotFoundError, PermissionError)

log = logging.getLogger("raycv")

ADDRESS_HELP = "Ray cluster address (default: $RAY_ADDRESS, else the Ray of `raycv cluster up`, else a new local Ray)"


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=task_names(), help="the workload: its config is pipelines/configs/TASK.yaml")
    p.add_argument("--data-root", help="folder holding the dataset's own top folder (local path or s3:// URI)")
    p.add_argument("--config", help="a YAML file of config values that override the task's defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set optim.lr=0.01 (repeatable)")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP processes) per run")
    p.add_argument("--gpus-per-worker", type=float,
                   help="GPUs per worker (0 = CPU training; more also turns on train.amp and train.channels_last "
                        "unless --set or --config gives them)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker")
    p.add_argument("--epochs", type=int, help="training epochs (train.epochs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--storage", help="Ray Train checkpoint storage (default: $RAYCV_STORAGE or ./ray_results)")


def resolved_config(args: argparse.Namespace) -> TaskConfig:
    """The task config with --config, --set and the shorthand flags applied, in that order."""
    overrides = list(args.overrides)
    shorthands = {
        "data.root": args.data_root, "scaling.workers": args.workers, "scaling.gpus_per_worker":
        args.gpus_per_worker, "scaling.cpus_per_worker": args.cpus_per_worker, "train.epochs": args.epochs,
    }
    overrides += [f"{key}={value}" for key, value in shorthands.items() if value is not None]
    cfg = load_config(args.task, args.config, overrides)
    if cfg.scaling.gpus_per_worker:
        cfg = cfg.with_values({key: True for key in GPU_DEFAULTS if not _explicit(key, overrides, args.config)})
    return cfg


#: Switched on for GPU runs (scaling.gpus_per_worker > 0) unless --set or --config gives them: bfloat16 autocast
#: and channels-last memory format (pipelines.steps).
GPU_DEFAULTS = ("train.amp", "train.channels_last")


def _explicit(key: str, overrides: list[str], config_file: str | None) -> bool:
    """Whether the user set ``key`` with ``--set`` or in the ``--config`` file."""
    return (any(o.split("=", 1)[0].strip() == key for o in overrides)
            or (config_file is not None and file_sets(config_file, key)))


@contextmanager
def _resume_hint(verb: str) -> Iterator[None]:
    """A run or sweep stopped by a signal within it ends its line with how this command goes on with it."""
    try:
        yield
    except RunInterrupted as stopped:
        if stopped.resume is None:
            raise
        raise stopped.with_hint(f"the same command with --resume {stopped.resume} {verb} it") from None


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.runners import RunRequest, runner_for
    from pipelines.tracking import resolve_tracking_uri

    cfg = resolved_config(args)
    request = RunRequest(resolve_tracking_uri(args.tracking_uri), address=args.address, storage=args.storage,
                         resume=args.resume, epochs_given=args.epochs is not None)
    with _resume_hint("continues"):
        return runner_for(cfg.task).train(cfg, request)


def cmd_tune(args: argparse.Namespace) -> int:
    from pipelines.cluster import connect
    from pipelines.report import format_table, ui_command
    from pipelines.runners import runner_for
    from pipelines.tracking import resolve_tracking_uri
    from pipelines.tune import run_sweep

    cfg = resolved_config(args)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    runner_for(cfg.task).preflight(cfg, tracking_uri)  # a bad base config or dataset fails here, not per trial
    connect(args.address)
    with _resume_hint("finishes"):
        outcome = run_sweep(cfg, tracking_uri, num_samples=args.num_samples, scheduler=args.scheduler,
                            max_concurrent=args.max_concurrent, resume=args.resume, storage=args.storage)
    metric = outcome.metric
    print()
    print(format_table(list(outcome.trials[0]), [list(t.values()) for t in outcome.trials]) if outcome.trials
          else "no trials ran")
    if outcome.failed:
        print(f"\n{len(outcome.failed)} of {len(outcome.trials)} trials failed:")
        for trial_id, error in outcome.failed.items():
            print(f"  {trial_id}: {error}")
    print(f"\nbest {metric} = {outcome.best_metric:.4g} with {outcome.best_config} (run {outcome.best_run_id})")
    if outcome.registered_version:
        print(f"registered as raycv-{cfg.task} version {outcome.registered_version} (alias 'best')")
    elif outcome.best_run_id:
        print(f"models:/raycv-{cfg.task}@best unchanged: it scored at least as well as this sweep's best")
    print(f"sweep parent run {outcome.parent_run_id}; resume an interrupted sweep: --resume {outcome.experiment_path}")
    print(f"MLflow UI: {ui_command(tracking_uri)}")
    return 0


def cmd_stylize(args: argparse.Namespace) -> int:
    from pipelines.runners import tasks_run_by
    from pipelines.style import cli_pairs
    from pipelines.style_runner import stylize
    from pipelines.tracking import resolve_tracking_uri

    shorthands = {"style.steps": args.steps, "style.size": list(args.size) if args.size else None,
                  "scaling.cpus_per_worker": args.cpus_per_worker, "scaling.gpus_per_worker": args.gpus_per_worker}
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in shorthands.items() if value is not None]
    [task] = tasks_run_by("stylize")
    cfg = load_config(task, args.config, overrides)
    if args.content or args.style or args.demo:
        cfg = cfg.with_values({"style.pairs": cli_pairs(args.content, args.style, args.demo)})
    output_dir = args.output_dir or f"{OUTPUT_DIR}/{task}"
    return stylize(cfg, resolve_tracking_uri(args.tracking_uri), args.address, output_dir)


def cmd_data(args: argparse.Namespace) -> int:
    from pipelines import data_commands

    if args.data_command == "make-demo":
        data_commands.make_demo_at(args.root, seed=args.seed, only=args.only)
    elif args.data_command == "download":
        path = data_commands.download(args.name, args.root)
        print(f"{args.name}: ready at {path}")
    elif args.data_command == "check":
        cfg = load_config(args.task, overrides=[f"data.root={args.root}"])
        return data_commands.check(cfg)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipelines.predict import predict
    from pipelines.tracking import LATEST_ALIAS, registered_name, resolve_tracking_uri

    model = args.model or f"models:/{registered_name(args.task)}@{LATEST_ALIAS}"
    try:
        written = predict(args.task, model, args.images, args.out, resolve_tracking_uri(args.tracking_uri))
    except ValueError as exc:
        if args.model or not str(exc).startswith(model):
            raise
        raise ValueError(f"{exc}: no {args.task} model trained in this tracking store yet (run `raycv train "
                         f"{args.task}` first, or pass --model)") from None
    for path in written:
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.cluster import connect
    from pipelines.demo import run_demo, selected_steps
    from pipelines.tracking import resolve_tracking_uri

    steps = selected_steps(args.only)  # a wrong --only fails before Ray starts
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    connect(args.address)
    with stop_signals_raise():  # also between steps, over Ray's own SIGTERM handler (exit 15, no line)
        run_demo(args.root, tracking_uri, steps)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from pipelines import warm_cluster

    if args.cluster_command == "up":
        cluster, started = warm_cluster.up(args.num_cpus)
        print(f"{'started' if started else 'already up:'} a local Ray for raycv at {cluster.address} with "
              f"{cluster.cpus} CPUs, dashboard and job API {cluster.dashboard_url}")
        print("raycv commands without --address (and $RAY_ADDRESS) join it; `raycv cluster down` stops it")
    elif args.cluster_command == "status":
        cluster = warm_cluster.recorded()
        if cluster is None:
            print("no raycv cluster is up (`raycv cluster up` starts one)")
            return 1
        if warm_cluster.running() is None:
            print(f"the raycv cluster recorded in {warm_cluster.state_file()} at {cluster.address} does not answer; "
                  "`raycv cluster down` clears it, `raycv cluster up` starts a new one")
            return 1
        print(f"up at {cluster.address} with {cluster.cpus} CPUs, dashboard and job API {cluster.dashboard_url}, "
              f"logs in {cluster.temp_dir}/session_latest/logs")
    else:
        stopped = warm_cluster.down()
        if stopped is None:
            print("no raycv cluster was up")
        else:
            cluster, processes = stopped
            print(f"stopped the raycv cluster at {cluster.address} ({processes} processes)")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raycv")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


VERBOSE_HELP = "raycv's debug lines and Ray's own INFO lines (execution plans, worker groups, checkpoints)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycv", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"raycv {_version()}")
    # -v after the subcommand too; SUPPRESS keeps a -v given before it when the subcommand has none.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_with_parents(verbose))

    train = sub.add_parser("train", help="train one task with Ray Train, tracked in MLflow")
    _add_run_options(train)
    train.add_argument("--resume", nargs="?", const="latest", metavar="RUN_ID",
                       help="continue an earlier run (default: the latest of this task) from its last checkpoint")
    train.set_defaults(func=cmd_train)

    sweep = sub.add_parser("tune", help="sweep hyperparameters with Ray Tune (each trial a Ray Train run)")
    _add_run_options(sweep)
    sweep.add_argument("--num-samples", type=int, default=4, help="trials to sample from the search space")
    sweep.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                       help="asha stops weak trials early (default), fifo runs every trial to the end")
    sweep.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    sweep.add_argument("--resume", metavar="PATH", help="continue the interrupted sweep stored at PATH")
    sweep.set_defaults(func=cmd_tune)

    predict = sub.add_parser("predict", help="apply a model logged by a raycv run to image files")
    predict.add_argument("task", choices=task_names(), help="the task whose model to apply")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or URIs (s3://...)")
    predict.add_argument("--model",
                         help="model of a raycv run: runs:/<run id>/model, models:/raycv-<task>@best (a sweep's "
                              "winner), models:/raycv-<task>/<version> (default: models:/raycv-<task>@latest, the "
                              "newest raycv train)")
    predict.add_argument("--out", default="predictions", help="folder for the pictures and JSON written")
    predict.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    predict.set_defaults(func=cmd_predict)

    demo_cmd = sub.add_parser("demo", help="write the demo data, train every task and one sweep, print a summary")
    demo_cmd.add_argument("--root", default="data/demo", help="where the demo datasets are (re)used or written")
    demo_cmd.add_argument("--only", action="append", help="only these demo steps (repeatable), e.g. --only cifar10")
    demo_cmd.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    demo_cmd.add_argument("--address", help=ADDRESS_HELP)
    demo_cmd.set_defaults(func=cmd_demo)

    style = sub.add_parser("stylize", help="neural style transfer, one Ray task per content/style pair, in MLflow")
    style.add_argument("--content", action="append", default=[], metavar="IMG",
                       help="content image: a file, URI or skimage:<name> (repeatable, pairs with --style in order)")
    style.add_argument("--style", action="append", default=[], metavar="IMG", help="style image (repeatable)")
    style.add_argument("--demo", action="store_true", help="also run the demo pairs of scikit-image pictures")
    style.add_argument("--steps", type=int, help="optimisation steps (style.steps)")
    style.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="size of the result (style.size)")
    style.add_argument("--config", help="a YAML file of config values that override the task's config")
    style.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set loss.style_weight=1e5 (repeatable)")
    style.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per pair")
    style.add_argument("--gpus-per-worker", type=float, help="GPUs per pair (0 = CPU)")
    style.add_argument("--output-dir", help=f"where the stylised images are written (default: {OUTPUT_DIR}/TASK)")
    style.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    style.add_argument("--address", help=ADDRESS_HELP)
    style.set_defaults(func=cmd_stylize)

    cluster = sub.add_parser("cluster", help="keep a local Ray running between commands (they join it)")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, parser_class=_with_parents(verbose))
    cluster_up = cluster_sub.add_parser("up", help="start it (raycv commands without --address then join it)")
    cluster_up.add_argument("--num-cpus", type=int, help="CPUs it offers (default: this machine's)")
    cluster_sub.add_parser("status", help="where it runs (exit status 1 when it does not)")
    cluster_sub.add_parser("down", help="stop its processes (only those: other Rays on the machine keep running)")
    cluster.set_defaults(func=cmd_cluster)

    data = sub.add_parser("data", help="prepare and check datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_with_parents(verbose))
    demo = data_sub.add_parser("make-demo", help="write small synthetic datasets in the real on-disk formats")
    demo.add_argument("--root", default="data/demo", help="where to write them (local path or s3:// URI)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the synthetic pictures")
    demo.add_argument("--only", action="append", help="only these datasets (repeatable), e.g. --only cifar10")
    download = data_sub.add_parser("download", help="download a real dataset (needs internet)")
    download.add_argument("name", help="a dataset a task declares (its name or alias, e.g. the task's name; an "
                                       "unknown name lists them)")
    download.add_argument("--root", default="data/real", help="where to put it (local path or s3:// URI)")
    check = data_sub.add_parser("check", help="count samples per split/class and find bad files")
    check.add_argument("task", choices=task_names(), help="the task whose dataset to check")
    check.add_argument("--root", default="data/demo", help="folder holding the dataset (local path or s3:// URI)")
    data.set_defaults(func=cmd_data)
    return parser


def _with_parents(*parents: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """An ArgumentParser class whose instances (the subcommands) also take ``parents``' options."""

    class SubcommandParser(argparse.ArgumentParser):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs.setdefault("parents", list(parents))
            super().__init__(*args, **kwargs)

    return SubcommandParser


def _join_warm_cluster() -> None:
    from pipelines import warm_cluster

    cluster = warm_cluster.join_if_running()
    if cluster is not None:
        log.info("joining the local Ray of `raycv cluster up` at %s (`raycv cluster down` stops it)", cluster.address)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # raycv prints its own run links
    logs.set_verbose(args.verbose)
    try:
        console_style()  # a wrong $RAYCV_PROGRESS fails here, before anything starts
        if hasattr(args, "address") and args.address is None and not os.environ.get("RAY_ADDRESS"):
            _join_warm_cluster()  # the commands that run on Ray take --address
        return int(args.func(args) or 0)
    except RunInterrupted as exc:
        print(f"raycv: {exc}", file=sys.stderr)
        return 128 + exc.signal_number
    except KeyboardInterrupt:  # Ctrl-C outside a training run's fit (which raises RunInterrupted)
        print("raycv: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"raycv: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``raycv`` console script: :func:`main`, then an exit without the interpreter's last full collections.

    At exit Python's garbage collector walks every object that torch, Ray and MLflow made: 2 s of the 3 s between
    a command's last line and its end (a one-epoch ``raycv train``, 2 cores), and inside the 3 s that
    ``ray job stop`` waits before it kills a job. ``gc.freeze`` takes them out of its reach; atexit handlers
    (``ray.shutdown``, MLflow's) still run. Not in :func:`main`, which in-process callers (tests) outlive."""
    code = main()
    gc.freeze()
    sys.exit(code)
