"""The ``artune`` logger and a log-once helper (decisions that repeat per call are logged once)."""

from __future__ import annotations

import logging

from artune import envs

__all__ = ["logger", "log_once"]

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
