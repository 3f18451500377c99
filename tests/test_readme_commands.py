"""README.md's commands, walked so that the README cannot drift from the code.

Every shell command in README.md's ```bash blocks is extracted (continuations joined, comments dropped, ``&&``
chains split) and given one of three treatments, each in a table below with its reason:

- **parsed and checked** (every ``raycv`` / ``python -m pipelines`` command, also the one inside each ``ray job
  submit`` and the one ``make demo`` runs): the real parser (``pipelines.cli.build_parser``) takes it, after the
  README's placeholders are filled (:data:`PARSE_FILL`); what it names must exist: the task, each ``--set`` key
  with a value of its type (``resolved_config``, the code ``raycv train`` runs first), values a run accepts
  (``check_values``), ``--config`` files, model URIs of the task's registry name, downloadable datasets. ``ray``
  and ``mlflow`` commands are parsed by Ray's and MLflow's own command lines. This costs no training.
- **run as written** (:data:`RUN`): the cheap ones, in a copy of the checkout standing in for a fresh clone after
  ``make demo`` (``data/demo`` the session's demo datasets, written by the same writers with the same seed;
  ``./mlflow.db`` holding registered models; ``.venv`` this virtualenv), each through bash after ``source
  .venv/bin/activate``, so that nothing lands in the repository. The local-cluster ``ray job submit`` runs
  verbatim on the session's two-node cluster, its README address replaced by that cluster's dashboard.
- **environment setup** (:data:`SETUP`): ``make``, ``source``, ``export``, ``ray start/stop/up/dashboard``,
  ``mlflow ui/server``: why each is not run, and what covers it.

A command in none of the tables fails :func:`test_every_readme_command_has_a_treatment`, so a new README command
must be given one. The models ``raycv predict`` applies here are untrained ones, logged and registered by
``pipelines.tracking`` (the functions ``raycv train`` uses) so that predicting costs seconds; predicting with a
trained model is tests/test_running_places.py's ``test_local_cli_train_then_predict``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from pipelines.cli import build_parser, resolved_config
from pipelines.config import check_values, load_config
from pipelines.report import ui_command

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV = Path(sys.prefix)
#: Folders and files of a checkout that a fresh clone does not have (as .gitignore lists them, plus git's own).
NOT_IN_A_CLONE = (".git", ".venv", "data", "mlruns", "mlartifacts", "mlflow.db", "ray_results", "outputs",
                  "predictions", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "*.egg-info")
#: The README's placeholders and what the parse checks put in their place. Files such as photo.png and me.jpg
#: stay as they are: the parser does not open them (the commands that run get a real photo.png).
PARSE_FILL = {"<id>": "0101-0000", "YOUR-BUCKET": "raycv-test", "$PWD": str(REPO),
              "postgresql://...": "postgresql://mlflow@db.internal/mlflow"}
#: A README command with one of these left after filling has a placeholder this test does not know.
UNFILLED = re.compile(r"<[^>]*>|YOUR-|\.\.\.")


# --- extraction -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadmeCommand:
    """One shell command of a README code block (or inline code span of prose)."""

    text: str  # as written: continuation lines joined, the comment after it dropped, split from its && neighbours
    line: int  # README line where it starts
    section: str  # the heading it is under
    inline: bool = False  # an inline code span of prose rather than a line of a ```bash block

    def words(self, fill: Mapping[str, str] | None = None) -> list[str]:
        """The command's argv, after replacing ``fill``'s placeholders in its text."""
        text = self.text
        for placeholder, value in (fill or {}).items():
            text = text.replace(placeholder, value)
        return shlex.split(text)

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def _split_shell_line(line: str) -> list[str]:
    """The ``&&``-separated commands of a README line, its comment and a trailing ``&`` (background) dropped.

    Quote-aware, so that a ``#`` or ``&&`` inside quotes stays part of its argument.
    """
    commands, current, quote, i = [], "", "", 0
    while i < len(line):
        char = line[i]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (not current or current[-1].isspace()):
            break
        elif line.startswith("&&", i):
            commands.append(current.strip())
            current, i = "", i + 2
            continue
        current += char
        i += 1
    commands.append(current.strip())
    commands[-1] = commands[-1].removesuffix("&").strip()
    return [c for c in commands if c]


def extract_commands(markdown: str) -> list[ReadmeCommand]:
    """Every shell command of ``markdown``'s ```bash blocks, in order."""
    found: list[ReadmeCommand] = []
    section, fenced, block, pending, start = "", False, False, "", 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        if line.startswith("```"):
            assert not pending, f"README.md:{start}: a continuation runs into the end of its block"
            fenced, block = not fenced, not fenced and line.strip() == "```bash"
            continue
        if fenced and not block:
            continue
        if not block:
            section = line.lstrip("#").strip() if line.startswith("#") else section
            continue
        stripped = line.rstrip()
        start = start if pending else number
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        commands = _split_shell_line(pending + stripped.strip())
        pending = ""
        found += [ReadmeCommand(c, start, section) for c in commands]
    return found


#: Inline spans of prose that name a command's form, not a command to type.
PROSE_FORMS = {"raycv predict TASK IMAGE...", "raycv data make-demo / download / check"}


def extract_inline_commands(markdown: str) -> list[ReadmeCommand]:
    """The prose's inline code spans that are whole ``raycv`` commands: a subcommand and its arguments (``raycv
    train`` alone names the command, ``raycv tune banana --config ...`` is one to type), except :data:`PROSE_FORMS`."""
    found = []
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), markdown, flags=re.S | re.M)
    for match in re.finditer(r"`((?:raycv|python -m pipelines) [^`]+)`", text):
        span = " ".join(match.group(1).split())
        if span in PROSE_FORMS or len(span.split()) < 3:
            continue
        number = text.count("\n", 0, match.start()) + 1
        found.append(ReadmeCommand(span, number, _section_at(markdown, number), inline=True))
    return found


def _section_at(markdown: str, line: int) -> str:
    headings = [(n, row.lstrip("#").strip()) for n, row in enumerate(markdown.splitlines()[:line], start=1)
                if row.startswith("#") and not _inside_block(markdown, n)]
    return headings[-1][1] if headings else ""


def _inside_block(markdown: str, line: int) -> bool:
    return sum(row.startswith("```") for row in markdown.splitlines()[:line - 1]) % 2 == 1


COMMANDS = extract_commands(README.read_text())
INLINE = extract_inline_commands(README.read_text())


# --- treatments -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    prefix: tuple[str, ...]  # the command's first words
    why: str
    section: str | None = None  # only under this heading

    def matches(self, command: ReadmeCommand) -> bool:
        return (tuple(command.words()[:len(self.prefix)]) == self.prefix
                and self.section in (None, command.section))


#: Environment setup: not run here, each for the reason given, and what covers it.
SETUP = [
    Rule(("make",), "`make -n TARGET` in the clone checks each target exists, and the raycv command `make demo` "
         "runs is parsed; not run: `make demo` (11 min) makes the state this walk starts from, stood in for by the "
         "session's demo data and registered models (tests/test_demo.py checks every demo step's config and the "
         "data writing; the steps' training paths are the training tests'); `make test` is this suite; `make "
         "bench` runs minutes of benchmarks"),
    Rule(("source", ".venv/bin/activate"), "run: every command run here runs after it, in bash, .venv being a link "
         "to this virtualenv"),
    Rule(("export",), "the tests' environment has RAY_AUTH_MODE=token (tests/conftest.py RAY_AUTH_ENV); the "
         "`export ... && ray get-auth-token` lines run as written"),
    Rule(("ray", "start"), "not run: a head on Ray's default ports collides with other Ray instances of a shared "
         "machine; tests/services.py starts the session's cluster with `ray start --head --node-ip-address="
         "127.0.0.1 --dashboard-host=127.0.0.1` plus ports of its own, and joins a node with `ray start --address`; "
         "parsed here by Ray's own CLI"),
    Rule(("ray", "stop"), "not run: it stops every Ray on the machine, other users' too; the session's nodes are "
         "stopped by killing their own process sessions (tests/services.py); parsed by Ray's CLI"),
    Rule(("ray", "up"), "needs AWS; cluster.yaml is tests/test_cluster_yaml.py's; parsed by Ray's CLI, and the "
         "file exists"),
    Rule(("ray", "dashboard"), "needs the `ray up` cluster; parsed by Ray's CLI, and the file exists"),
    Rule((".venv/bin/mlflow", "ui"), "not run: it starts in ~30 s on 2 cores; it is the command raycv prints "
         "(pipelines.report.ui_command), and the session's mlflow_server fixture serves a SQLite store the same "
         "way; parsed by MLflow's CLI"),
    Rule(("mlflow", "server"), "needs PostgreSQL and the host's address; the session's mlflow_server fixture runs "
         "`mlflow server --backend-store-uri sqlite:... --artifacts-destination s3://...`; parsed by MLflow's CLI"),
]
#: Run as written (after filling placeholders where the README has them), each cheap: seconds, no training.
RUN = [
    Rule(("python", "-m", "pipelines"), "prints the help"),
    Rule(("raycv", "data", "check"), "reads the dataset (data/demo; the S3 one on the session's S3 server)"),
    Rule(("raycv", "predict"), "applies the registered models of ./mlflow.db to photo.png"),
    Rule(("ray", "get-auth-token"), "writes ~/.ray/auth_token (HOME a temporary folder)"),
    Rule(("chmod", "600", "~/.ray/auth_token"), "makes that token file private, in the same line"),
    Rule(("ray", "job", "submit"), "trains cifar10 for 2 epochs on the session's cluster, submitted verbatim",
         section="A local cluster"),
]
#: Parsed and checked only, each for the reason given, and where the path it takes is run.
PARSE_ONLY = [
    Rule(("raycv", "train"), "trains for minutes at the README's epochs (5), workers or GPUs; raycv train runs in "
         "the local-cluster job here, tests/test_running_places.py (local Ray) and tests/test_cluster.py"),
    Rule(("raycv", "tune"), "a sweep of 8 trials runs for many minutes; tests/test_sweep.py and tests/"
         "test_cluster.py run sweeps, resumed ones too"),
    Rule(("raycv", "stylize"), "300 steps at 300x450 take minutes and need the reader's me.jpg / starry.jpg; "
         "tests/test_style_run.py runs style transfer"),
    Rule(("raycv", "data", "make-demo"), "the session's S3 demo root lacks hotdog-source, whose 1,500 files make-"
         "demo would write and upload (45 s here); tests/test_cluster.py runs make-demo on S3 and its reuse"),
    Rule(("raycv", "data", "download"), "needs the internet and the real datasets' size; tests/test_download.py "
         "downloads from a local server"),
    Rule(("ray", "job", "submit"), "needs the AWS cluster and GPUs", section="On a cluster"),
    Rule(("raycv", "cluster"), "`up` starts a Ray head that the walk's other commands would then join; "
         "tests/test_warm_cluster.py runs up, status, a train that joins it, and down"),
]


def treatments(command: ReadmeCommand) -> list[tuple[str, Rule]]:
    return [(name, rule) for name, table in (("setup", SETUP), ("run", RUN), ("parse", PARSE_ONLY))
            for rule in table if rule.matches(command)]


def _ids(commands: list[ReadmeCommand]) -> list[str]:
    return [f"L{c.line}-{'-'.join(c.words()[:3])}" for c in commands]


# --- parse checks -----------------------------------------------------------------------------------------------

def raycv_argv(words: list[str]) -> list[str] | None:
    """The arguments given to raycv by ``words``: ``raycv ...``, ``.venv/bin/raycv ...``, ``python -m pipelines
    ...``, or the entrypoint of ``ray job submit ... -- raycv ...``; None for other commands."""
    if words and Path(words[0]).name == "raycv":
        return words[1:]
    if words[:3] == ["python", "-m", "pipelines"]:
        return words[3:]
    if words[:3] == ["ray", "job", "submit"] and "--" in words:
        return raycv_argv(words[words.index("--") + 1:])
    return None


def parse_raycv(argv: list[str], where: str) -> argparse.Namespace | None:
    """``argv`` parsed by raycv's own parser; None for ``--help`` / ``--version``, which must exit with status 0."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            return build_parser().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code == 0 and {"-h", "--help", "--version"} & set(argv):
            return None
        pytest.fail(f"{where}: raycv's parser refuses it: {err.getvalue().strip()}")


def check_raycv_command(args: argparse.Namespace) -> None:
    """What a parsed raycv command names exists: its task's config keys and values, files, model URIs, datasets."""
    from cvtasks.tasks import get_task
    from cvtasks.tasks.base import Task
    from pipelines.download import source_named
    from pipelines.tracking import registered_name

    if args.command in ("train", "tune"):
        cfg = resolved_config(args)  # --config, then --set, then the shorthand flags: as raycv train/tune do
        check_values(cfg)
        if args.command == "tune" and not args.resume:
            assert cfg.raw.get("search"), f"{args.task} has no search: space to sweep"
    elif args.command == "stylize":
        from pipelines.runners import tasks_run_by

        # cmd_stylize's shorthands: --steps is style.steps, --size is style.size.
        shorthands = [f"style.steps={args.steps}"] if args.steps else []
        shorthands += [f"style.size={list(args.size)}"] if args.size else []
        [task] = tasks_run_by("stylize")
        check_values(load_config(task, args.config, [*args.overrides, *shorthands]))
    elif args.command == "predict":
        assert isinstance(get_task(args.task), Task), f"{args.task} logs no model to predict with"
        if args.model:
            assert args.model.startswith(("runs:/", f"models:/{registered_name(args.task)}@",
                                          f"models:/{registered_name(args.task)}/")), args.model
    elif args.command == "data" and args.data_command == "check":
        load_config(args.task, overrides=[f"data.root={args.root}"])
    elif args.command == "data" and args.data_command == "download":
        source_named(args.name)
    elif args.command in ("data", "demo") and args.only:
        from pipelines.data_commands import _chosen

        _chosen(args.only)
    config = getattr(args, "config", None)
    if config:
        assert (REPO / config).is_file(), f"--config {config}: no such file in the repository"


RAYCV_COMMANDS = [c for c in [*COMMANDS, *INLINE] if raycv_argv(c.words()) is not None]


def test_the_readme_has_the_commands_this_walk_is_about():
    """The extraction finds the usage section, the local-cluster example and the prose's inline commands."""
    sections = {c.section for c in COMMANDS}
    assert {"Quick start", "Using raycv", "A local cluster", "On a cluster", "Development"} <= sections
    usage = [c.words()[0] for c in COMMANDS if c.section == "Using raycv"]
    assert usage[0] == "source" and usage.count("raycv") >= 9 and "python" in usage
    assert any(c.words()[:3] == ["ray", "job", "submit"] for c in COMMANDS if c.section == "A local cluster")
    assert any("--config" in c.words() for c in INLINE)


def test_extraction_joins_continuations_and_drops_comments():
    sample = "\n".join(["# Title", "```", "# not a heading", "not bash", "```", "```bash",
                        "export A=1 && tool --x '#not a comment'   # a comment",
                        "ray job submit --address http://h:1 -- \\", "    raycv train cifar10 --epochs 2",
                        "ray dashboard cluster.yaml &           # background", "```"])
    assert [(c.text, c.line, c.section) for c in extract_commands(sample)] == [
        ("export A=1", 7, "Title"), ("tool --x '#not a comment'", 7, "Title"),
        ("ray job submit --address http://h:1 -- raycv train cifar10 --epochs 2", 8, "Title"),
        ("ray dashboard cluster.yaml", 10, "Title")]


@pytest.mark.parametrize("command", [*COMMANDS, *INLINE], ids=_ids([*COMMANDS, *INLINE]))
def test_every_readme_command_has_a_treatment(command):
    """Exactly one of SETUP, RUN and PARSE_ONLY says what happens to it; raycv commands are parsed in any case."""
    found = treatments(command)
    if command.inline:  # the prose's commands are all parsed and checked, none run
        assert raycv_argv(command.words()) is not None, command
        return
    assert len(found) == 1, f"{command}: give it one treatment in SETUP, RUN or PARSE_ONLY (now {found})"


def test_every_rule_still_matches_a_readme_command():
    """A rule whose command left the README is removed with it, so that the tables say what is true."""
    unused = [rule.prefix for rule in [*SETUP, *RUN, *PARSE_ONLY] if not any(rule.matches(c) for c in COMMANDS)]
    assert not unused, unused


@pytest.mark.parametrize("argv", [
    ["train", "cifar10", "--num-workers", "2"],  # an option renamed
    ["train", "cifar100"],  # a task that is not registered
    ["train", "cifar10", "--set", "model.widht=64"],  # a config key that does not exist
    ["train", "hotdog", "--set", "augment.size=large"],  # a value of the wrong type
    ["train", "cifar10", "--epochs", "0"],  # a value no run accepts
    ["tune", "banana", "--config", "pipelines/configs/sweeps/no_such_sweep.yaml"],  # a config file not there
    ["predict", "banana", "--model", "models:/raycv-hotdog@best", "photo.png"],  # another task's model
    ["data", "download", "style"],  # a dataset with no download
])
def test_the_checks_catch_a_drifted_command(argv):
    """What the parse checks refuse: each a README command gone stale in one way."""
    from pipelines.config import ConfigError

    with pytest.raises((pytest.fail.Exception, ConfigError, AssertionError, ValueError)):
        args = parse_raycv(argv, "drifted")
        assert args is not None
        check_raycv_command(args)


def test_every_placeholder_is_in_the_readme_and_none_is_left_unfilled():
    texts = [c.text for c in [*COMMANDS, *INLINE]]
    assert all(any(p in t for t in texts) for p in PARSE_FILL), "a PARSE_FILL placeholder the README lost"
    left = [str(c) for c in [*COMMANDS, *INLINE] if UNFILLED.search(" ".join(c.words(PARSE_FILL)))]
    assert not left, f"placeholders this test does not fill: {left}"


@pytest.mark.parametrize("command", RAYCV_COMMANDS, ids=_ids(RAYCV_COMMANDS))
def test_raycv_command_parses_and_names_what_exists(command):
    args = parse_raycv(raycv_argv(command.words(PARSE_FILL)), str(command))
    if args is not None:
        check_raycv_command(args)


TOOL_COMMANDS = [c for c in COMMANDS if c.words()[0] in ("ray", "mlflow", ".venv/bin/mlflow")]


@pytest.mark.parametrize("command", TOOL_COMMANDS, ids=_ids(TOOL_COMMANDS))
def test_ray_and_mlflow_commands_parse_with_their_own_cli(command):
    """Options renamed or removed in a Ray or MLflow upgrade fail here; files they name exist."""
    words = command.words(PARSE_FILL)
    if words[0] == "ray":
        from ray.scripts.scripts import cli
    else:
        from mlflow.cli import cli
    group: click.Command = cli
    rest = words[1:]
    while isinstance(group, click.Group):
        found = group.get_command(click.Context(group), rest[0]) if rest else None  # aliases too (mlflow ui)
        assert found is not None, f"{command}: no such command {rest[:1]}"
        group, rest = found, rest[1:]
    try:
        params = group.make_context(words[0], list(rest)).params
    except click.UsageError as exc:
        pytest.fail(f"{command}: {exc.format_message()}")
    if "cluster_config_file" in params:
        assert (REPO / params["cluster_config_file"]).is_file()
    if "working_dir" in params:
        assert params["working_dir"] == "." and params["entrypoint"][0] == "raycv"


def test_mlflow_ui_command_is_the_one_raycv_prints():
    [command] = [c for c in COMMANDS if c.words()[:2] == [".venv/bin/mlflow", "ui"]]
    printed = ui_command(f"sqlite:///{REPO}/mlflow.db").split("#")[0].strip()
    assert command.text.replace("$PWD", str(REPO)) == f".venv/bin/{printed}"


# --- a fresh clone after `make demo` ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clone(tmp_path_factory, demo_root) -> Path:
    """A copy of the checkout as a fresh clone has it, after ``make demo``: ``.venv`` (a link to this virtualenv),
    ``data/demo`` (a link to the session's demo datasets, which ``raycv data make-demo``'s writers wrote with its
    default seed) and ``photo.png`` (the README's placeholder image: one of the demo's banana pictures)."""
    root = tmp_path_factory.mktemp("readme") / "raycv"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE), symlinks=True)
    (root / ".venv").symlink_to(VENV, target_is_directory=True)
    (root / "data").mkdir()
    (root / "data" / "demo").symlink_to(demo_root, target_is_directory=True)
    shutil.copy(sorted((demo_root / "banana-detection" / "bananas_val" / "images").glob("*.png"))[0],
                root / "photo.png")
    return root


@pytest.fixture(scope="module")
def registered_models(clone: Path) -> dict[str, str]:
    """``./mlflow.db`` as ``make demo`` leaves it for ``raycv predict``: models of banana (``@latest``) and hotdog
    (``@best``, a sweep's alias) registered by ``pipelines.tracking``, as ``raycv train`` and ``raycv tune`` register
    theirs. The models are freshly initialised (no training): predict only has to rebuild and apply them."""
    from mlflow.tracking import MlflowClient

    from cvtasks.classification import ClassificationTask
    from cvtasks.tasks import get_task
    from pipelines import tracking

    client = MlflowClient(tracking.resolve_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}"))
    versions = {}
    for task_name, alias in (("banana", tracking.LATEST_ALIAS), ("hotdog", tracking.BEST_ALIAS)):
        cfg = load_config(task_name, overrides=[f"data.root={clone / 'data' / 'demo'}", *(
            ["model.weights=scratch"] if task_name == "hotdog" else [])])
        task = get_task(task_name)
        run_id = tracking.create_run(client, task_name, cfg, run_name=f"{task_name}-readme-untrained")
        class_names = task.class_names(cfg) if isinstance(task, ClassificationTask) else None
        tracking.log_model_state(client, run_id, task.build_model(cfg).state_dict(), class_names)
        client.set_terminated(run_id)
        versions[task_name] = tracking.register_model(client, task_name, run_id, alias)
    return versions


def _user_env(**extra: str) -> dict[str, str]:
    """A user's shell after ``make demo``: none of the session's addresses, stores or storage."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAYCV_STORAGE")}
    return {**env, **extra}


def run_as_written(command: ReadmeCommand, cwd: Path, env: Mapping[str, str], fill: Mapping[str, str] | None = None,
                   timeout: float = 300) -> subprocess.CompletedProcess:
    """``command`` run by bash in ``cwd`` after ``source .venv/bin/activate``, its ``fill`` placeholders filled
    (bash expands the rest, ``$PWD`` too); fails the test unless it exits with status 0."""
    text = command.text
    for placeholder, value in (fill or {}).items():
        text = text.replace(placeholder, value)
    result = subprocess.run(["bash", "-c", f"source .venv/bin/activate && {text}"], cwd=cwd, env=dict(env),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\nexit {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


def _check_help(result: subprocess.CompletedProcess, clone: Path) -> None:
    assert result.stdout.startswith("usage: raycv ")
    assert all(sub in result.stdout for sub in ("train", "tune", "predict", "stylize", "data", "demo"))


def _check_data_check(result: subprocess.CompletedProcess, clone: Path) -> None:
    assert result.stdout.strip().endswith("ok"), result.stdout[-2000:]
    assert re.search(r"^train: \d+ samples$", result.stdout, re.M), result.stdout[-2000:]


def _check_predict(result: subprocess.CompletedProcess, clone: Path) -> None:
    out = clone / "predictions"
    [written] = [Path(p) for p in result.stdout.split() if p.endswith(".json")]
    records = json.loads((clone / written).read_text())
    assert [r["image"] for r in records] == ["photo.png"]
    assert (out / "predictions.png").is_file() or (out / "000_photo.png").is_file()
    if written.name == "predictions.json":  # hotdog: a class of the two and its probability
        assert records[0]["class"] in ("hotdog", "not-hotdog") and 0 <= records[0]["probability"] <= 1
    else:  # banana: detections.json, with the image's own size and a (maybe empty) list of boxes
        assert records[0]["width"] > 0 and records[0]["height"] > 0 and isinstance(records[0]["detections"], list)


#: What each command run locally must print or write, by its first words.
LOCAL_CHECKS: dict[tuple[str, ...], Callable[[subprocess.CompletedProcess, Path], None]] = {
    ("python", "-m", "pipelines"): _check_help,
    ("raycv", "data", "check"): _check_data_check,
    ("raycv", "predict"): _check_predict,
}


def _local_check(command: ReadmeCommand) -> Callable[[subprocess.CompletedProcess, Path], None] | None:
    words = tuple(command.words())
    return next((check for prefix, check in LOCAL_CHECKS.items() if words[:len(prefix)] == prefix), None)


def _runs(command: ReadmeCommand) -> bool:
    return any(name == "run" for name, _ in treatments(command))


LOCAL_RUNS = [c for c in COMMANDS if _runs(c) and _local_check(c) and "s3://" not in c.text]


@pytest.mark.parametrize("command", LOCAL_RUNS, ids=_ids(LOCAL_RUNS))
def test_command_runs_as_written_on_a_fresh_clone(command, clone, request):
    if command.words()[:2] == ["raycv", "predict"]:
        request.getfixturevalue("registered_models")
    check = _local_check(command)
    assert check is not None
    check(run_as_written(command, clone, _user_env()), clone)


def test_every_command_to_run_is_run():
    """RUN's commands are run by one of this module's tests: locally, in an auth-token line, on S3 or the cluster."""
    elsewhere = [c for c in COMMANDS if _runs(c) and (c.line in AUTH_LINES or "s3://" in c.text
                                                      or c.words()[:3] == ["ray", "job", "submit"])]
    assert sorted(map(str, LOCAL_RUNS + elsewhere)) == sorted(str(c) for c in COMMANDS if _runs(c))


def test_the_help_lines_comment_holds(clone):
    """``python -m pipelines --help  # same CLI (raycv --version, -v anywhere)``: its comment's ``raycv --version``,
    run as written, prints what ``python -m pipelines --version`` prints (``-v`` anywhere: tests/test_cli.py)."""
    [row] = [r for r in README.read_text().splitlines() if r.startswith("python -m pipelines --help")]
    assert "raycv --version" in row.split("#", 1)[1]
    env = _user_env()
    versions = [run_as_written(ReadmeCommand(text, 0, "Using raycv"), clone, env).stdout.strip()
                for text in ("raycv --version", "python -m pipelines --version")]
    assert versions[0] == versions[1] and re.fullmatch(r"raycv \S+", versions[0]), versions


AUTH_LINES = sorted({c.line for c in COMMANDS if c.words()[:2] == ["ray", "get-auth-token"]})


@pytest.mark.parametrize("line", AUTH_LINES)
def test_auth_token_lines_run_as_written(line, clone, tmp_path):
    """The whole README line (``[export RAY_AUTH_MODE=token &&] ray get-auth-token --generate && chmod 600 ...``)
    writes the token file the README names, readable by this user only, under a temporary HOME and without the
    session's own token settings. (Without the ``chmod``, Ray leaves it as the umask makes it: 0644 here.)"""
    row = README.read_text().splitlines()[line - 1]
    text = " && ".join(_split_shell_line(row))
    env = {k: v for k, v in _user_env(HOME=str(tmp_path)).items() if not k.startswith("RAY_AUTH")}
    result = subprocess.run(["bash", "-c", f"source .venv/bin/activate && {text}"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    token_file = tmp_path / ".ray" / "auth_token"
    assert re.fullmatch(r"[0-9a-f]{32,}", token_file.read_text().strip())
    assert token_file.stat().st_mode & 0o077 == 0, oct(token_file.stat().st_mode)  # no other user can read it


@pytest.mark.parametrize("target", sorted({c.words()[1] for c in COMMANDS if c.words()[0] == "make"}))
def test_make_targets_exist_and_demo_runs_a_valid_raycv_command(target, clone):
    """``make -n`` prints what a target would run without running it; for ``demo`` its raycv command is parsed."""
    result = subprocess.run(["make", "-n", target], cwd=clone, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    if target == "demo":
        [line] = [row for row in result.stdout.splitlines() if raycv_argv(shlex.split(row)) is not None]
        args = parse_raycv(raycv_argv(shlex.split(line)), f"make demo: {line}")
        assert args is not None and args.command == "demo"
        check_raycv_command(args)


# --- on the session's services ----------------------------------------------------------------------------------

S3_RUNS = [c for c in COMMANDS if _runs(c) and "s3://" in c.text]


@pytest.mark.slow
def test_s3_data_check_runs_as_written(clone, s3_server, s3_demo_root):
    """The S3 section's ``raycv data check voc --root s3://YOUR-BUCKET/datasets``, YOUR-BUCKET the session's bucket,
    whose ``datasets/`` holds the demo data the cluster tests read."""
    assert [c.words()[:3] for c in S3_RUNS] == [["raycv", "data", "check"]]
    assert s3_demo_root == s3_server.uri("datasets")
    checked = run_as_written(S3_RUNS[0], clone, _user_env(**s3_server.env), {"YOUR-BUCKET": s3_server.bucket})
    _check_data_check(checked, clone)


@pytest.mark.slow
def test_local_cluster_job_submit_runs_as_written(clone, ray_cluster):
    """The local-cluster example's ``ray job submit``, word for word but for its address (the session's cluster
    has its dashboard on a port of its own): the checkout uploaded without data/, the absolute ``$PWD/data/demo``
    read by the job on the cluster's nodes, cifar10 trained for the README's 2 epochs and registered. Its token is
    the session's (``RAY_AUTH_TOKEN_PATH``, the cluster's) rather than ``~/.ray/auth_token``."""
    [command] = [c for c in COMMANDS if c.section == "A local cluster" and c.words()[:3] == ["ray", "job", "submit"]]
    env = _user_env(**ray_cluster.env)
    result = run_as_written(command, clone, env, {"http://127.0.0.1:8265": ray_cluster.dashboard_url}, timeout=600)
    output = result.stdout + result.stderr
    assert "succeeded" in output.lower(), output[-4000:]
    assert "\nseconds: start-up " in output and "registered as raycv-cifar10" in output, output[-4000:]
