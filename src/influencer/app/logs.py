"""What a run records about itself: ``explain.log`` in the run directory, console lines that leave
the progress bars intact, and the time each stage took."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

LOG_FILE = "explain.log"


class TqdmHandler(logging.StreamHandler):
    """Console log lines that do not break the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def run_logging(run_dir: Path, console: bool) -> Iterator[None]:
    """Log everything to ``run_dir/explain.log`` (and INFO and above to the console) while inside."""
    logger = logging.getLogger("influencer")
    handlers: list[logging.Handler] = []
    file_handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.DEBUG)
    handlers.append(file_handler)
    if console:
        console_handler = TqdmHandler()
        console_handler.setFormatter(logging.Formatter("%(message)s"))
        console_handler.setLevel(logging.INFO)
        handlers.append(console_handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    for h in handlers:
        logger.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)


class Stopwatch:
    """Seconds per named stage, summed over repeats: ``with clock("fit"): ...``.

    On CUDA the device is synchronised before a stage is stopped, so queued kernels count to it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
