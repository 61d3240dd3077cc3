"""The ``artune`` logger and a log-once helper (decisions that repeat per call are logged once)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from artune import envs

__all__ = ["logger", "log_once", "drop_stdout"]

logger = logging.getLogger("artune")
_seen: set[str] = set()


def _configure() -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[artune %(levelname)s] %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.setLevel(envs.get("ARTUNE_LOG_LEVEL"))
    except ValueError as exc:  # importing artune (in SGLang's ranks too) must not fail on it
        logger.setLevel("INFO")
        logger.warning("%s; logging at INFO", exc)


_configure()


def log_once(key: str, msg: str, level: int = logging.INFO) -> None:
    """Log ``msg`` the first time ``key`` is seen in this process."""
    if key in _seen:
        return
    _seen.add(key)
    logger.log(level, msg)


def drop_stdout() -> None:
    """The reader of stdout has gone (``artune ... | head``): send whatever is still written
    there, by Python or at exit, to /dev/null instead of raising BrokenPipeError."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
