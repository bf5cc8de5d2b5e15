"""What a run records about itself: ``explain.log`` in the run directory, console lines that leave
the progress bars intact, the warnings of the run (for the summary) and the time each stage took."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from influencer.app.run.store import RunStore
from influencer.errors import InfluencerError
from influencer.files import open_no_follow

LOG_FILE = "explain.log"


class TqdmHandler(logging.StreamHandler):
    """Console log lines that do not break the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class RunFileHandler(logging.StreamHandler):
    """The run's log file, opened without following a link planted in its place
    (:func:`influencer.files.open_no_follow`). A line that cannot be written (a full disk) is
    dropped without a traceback: the error that stops the run is what the user must see."""

    def __init__(self, path: Path) -> None:
        super().__init__(open_no_follow(path, "a", text=True))

    def close(self) -> None:
        try:
            self.flush()
            self.stream.close()
        finally:
            super().close()

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging.Handler API)
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


class WarningList(logging.Handler):
    """Collects the messages of WARNING records and above (they go into ``summary.json``)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _log_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    logging.getLogger("influencer.explain").warning("%s: %s", category.__name__, message)


@contextlib.contextmanager
def logged_stop(log: logging.Logger) -> Iterator[None]:
    """Record in the run's log file why a command stopped, then let the error go on to the caller.

    An :class:`InfluencerError` is one line (the caller shows it); anything else is logged with its
    traceback, which the console never shows.
    """
    try:
        yield
    except InfluencerError as exc:
        log.error("stopped: %s", exc, extra={"file_only": True})
        raise
    except Exception:
        log.error("stopped by an unexpected error:", exc_info=True, extra={"file_only": True})
        raise


@contextlib.contextmanager
def run_logging(run_dir: Path, console: bool, file_name: str = LOG_FILE) -> Iterator[list[str]]:
    """Log everything to ``run_dir/file_name`` (and INFO and above to the console) while inside.

    Python warnings raised meanwhile (e.g. an approximate solve accepted with
    ``on_unconverged="warn"``) are logged too, each time they occur. Yields the list of the run's
    warning messages, filled as they are logged.
    """
    logger = logging.getLogger("influencer")
    collected = WarningList()
    handlers: list[logging.Handler] = [collected]
    file_handler = RunFileHandler(run_dir / file_name)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.DEBUG)
    handlers.append(file_handler)
    if console:
        console_handler = TqdmHandler()
        console_handler.addFilter(lambda record: not getattr(record, "file_only", False))
        console_handler.setFormatter(logging.Formatter("%(message)s"))
        console_handler.setLevel(logging.INFO)
        handlers.append(console_handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    for h in handlers:
        logger.addHandler(h)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", RuntimeWarning)
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = _log_warning
            yield collected.messages
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)


class Stopwatch:
    """Seconds per named stage, summed over repeats: ``with clock("fit"): ...``.

    On CUDA the device is synchronised before a stage is stopped, so queued kernels count to it.
    :meth:`stop` ends an open stage early (e.g. ``total`` before the summary that reports it).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.timings: dict[str, float] = {}
        self._open: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._open[name] = time.perf_counter()
        try:
            yield
        finally:
            self.stop(name)

    def stop(self, name: str) -> None:
        """End the open stage ``name`` now (nothing if it has ended)."""
        start = self._open.pop(name, None)
        if start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def opened_run(
    root: Path,
    console: bool,
    log: logging.Logger,
    title: str,
    *,
    file_name: str = LOG_FILE,
    settings: str | None = None,
    after: str = "",
) -> Iterator[tuple[RunStore, list[str]]]:
    """A command's run directory ``root``, opened: ``(store, warned)`` while inside.

    Locks and opens the :class:`RunStore`, logs to ``root/file_name`` (see :func:`run_logging`),
    opens the log with ``title``, the time and ``after`` (and ``settings`` at debug level), and records why
    the command stopped (:func:`logged_stop`).
    """
    with RunStore(root) as store, run_logging(root, console, file_name) as warned:
        log.info("%s (%s)%s", title, datetime.now(timezone.utc).isoformat(timespec="seconds"), after)
        if settings is not None:
            log.debug("settings: %s", settings)
        with logged_stop(log):
            yield store, warned
