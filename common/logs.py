"""One log format for fedlora's own lines, so they stand out in Flower's stream."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """`HH:MM:SS LEVEL fedlora.<name>: message` on stderr, not duplicated through Flower's handlers."""
    logger = logging.getLogger(f"fedlora.{name}")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
