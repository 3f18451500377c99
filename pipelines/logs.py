"""How raycv's own processes log: the CLI and the processes it spawns use the same format."""

from __future__ import annotations

import logging


def configure(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
