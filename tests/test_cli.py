"""The command line itself: help text on every option, ``--version``, ``-v`` before or after the subcommand, and
``python -m pipelines`` as the same program as ``raycv``."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import build_parser, resolved_config
from pipelines.config import ConfigError
from pipelines.report import seconds_line

BIN = Path(sys.executable).parent


def _parsers(parser: argparse.ArgumentParser, name: str = "raycv"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_and_argument_has_help_text():
    missing = [f"{name} {action.dest}" for name, parser in _parsers(build_parser()) for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert not missing, missing


@pytest.mark.parametrize("argv", [["-v", "data", "check", "voc"], ["data", "check", "voc", "-v"],
                                  ["train", "cifar10", "--verbose"], ["--verbose", "tune", "hotdog"]])
def test_verbose_goes_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).verbose is True


def test_quiet_by_default():
    assert build_parser().parse_args(["train", "cifar10"]).verbose is False


def test_seconds_line_lists_the_phases_in_order_with_their_total():
    assert seconds_line({"start-up": 12.34, "Ray": 9.0, "training": 30.0}) == \
        "seconds: start-up 12.3, Ray 9.0, training 30.0 (total 51)"


def test_version_is_the_same_for_raycv_and_python_m_pipelines():
    outputs = [subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
               for cmd in ([str(BIN / "raycv"), "--version"], [sys.executable, "-m", "pipelines", "--version"])]
    assert outputs[0] == outputs[1] and outputs[0].startswith("raycv ")


def _train_config(*argv: str):
    return resolved_config(build_parser().parse_args(["train", "cifar10", *argv]))


def test_gpu_runs_turn_on_amp_and_channels_last_unless_given(tmp_path):
    def flags(cfg):
        return cfg.train.amp, cfg.train.channels_last

    assert flags(_train_config()) == (False, False)  # CPU: both off
    assert flags(_train_config("--gpus-per-worker", "1")) == (True, True)
    assert flags(_train_config("--gpus-per-worker", "0.5", "--set", "train.channels_last=false")) == (True, False)
    assert flags(_train_config("--gpus-per-worker", "1", "--set", "train.amp=false")) == (False, True)
    partial = tmp_path / "gpu.yaml"
    partial.write_text("train:\n  channels_last: false\n")
    assert flags(_train_config("--gpus-per-worker", "1", "--config", str(partial))) == (True, False)
    assert flags(_train_config("--set", "train.channels_last=true")) == (False, True)  # on CPU when asked


def test_channels_last_is_a_typed_boolean():
    with pytest.raises(ConfigError, match="train.channels_last must be a boolean"):
        _train_config("--set", "train.channels_last=1")
    assert isinstance(_train_config().train.channels_last, bool)


def test_an_address_where_nothing_listens_fails_in_one_line(tmp_path):
    """Ray would retry a dead address for many minutes; raycv checks that something answers there first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    result = subprocess.run(
        [str(BIN / "raycv"), "demo", "--address", f"127.0.0.1:{port}", "--root", str(tmp_path / "demo"),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"raycv: error: cannot connect to the Ray cluster at 127.0.0.1:{port}: nothing answers there")
    assert not (tmp_path / "demo").exists()


def test_an_unknown_demo_step_fails_in_one_line_before_ray_starts(tmp_path):
    """The step names are checked first: with an address where nothing listens, the error is still the step's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [str(BIN / "raycv"), "demo", "--only", "hotdog-source", "--only", "nosuch", "--address", f"127.0.0.1:{port}",
         "--root", str(tmp_path / "demo"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("raycv: error: unknown demo step(s) nosuch; known: cifar10, hotdog-source"), last
    assert not (tmp_path / "demo").exists()
