"""Per-package logging: rank 0 prints to stdout, every rank writes its own log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

PACKAGES = ("pml_dist", "ffcv_data")
_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int = 0, log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Configure the project's loggers; safe to call again (handlers are replaced, not added)."""
    handlers: list[logging.Handler] = []
    if rank == 0:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(stream)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        handlers.append(file_handler)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            handler.addFilter(_RankFilter(rank))
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def enable_crash_traces() -> None:
    """A crash in native code (torch, numba, FFCV) still prints the Python stack of every thread."""
    import faulthandler

    try:
        faulthandler.enable()
    except (OSError, ValueError, AttributeError):  # stderr is not a real file (e.g. captured)
        pass
