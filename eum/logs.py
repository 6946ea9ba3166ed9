"""structlog: JSON key-value logs with the request id bound per request."""

from __future__ import annotations

import logging
import sys
import threading

import structlog


class LineLogger:
    """structlog's PrintLogger, but each line and its newline in one write. The workers
    of `eum serve` share one stdout, and unbuffered (PYTHONUNBUFFERED=1, the image)
    PrintLogger's `print(line, flush=True)` wrote the line and its newline apart, so
    another worker's line landed between them (the keys audit of 2026-12-06i: 64 of
    21,717 lines of a two-worker run could not be parsed, access lines among them).
    structlog's WriteLogger writes once too, but binds `sys.stdout` when made, and a
    cached logger then writes to a stream swapped out since (a test's capture); this
    looks it up at each line, as `print` does."""

    _lock = threading.Lock()

    def __init__(self, file=None):
        self._file = file

    def msg(self, message: str) -> None:
        file = self._file or sys.stdout
        with self._lock:
            file.write(message + "\n")
            file.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


def configure_logging(level: str = "INFO", json: bool = True, file=None) -> None:
    """Log lines at `level` and above to `file` (the service: stdout; a command: stderr,
    its stdout holds its results); console lines in colour only to a terminal."""
    colors = (file or sys.stdout).isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=colors)
    structlog.configure(
        logger_factory=lambda *_: LineLogger(file),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )


def uvicorn_log_config(json: bool, level: str = "info") -> dict | None:
    """uvicorn's own lines (a worker started, died or stopped, SIGTERM received, a worker
    whose start failed, with its traceback) as the service's: one JSON object a line on
    stdout with `event`, `level`, `logger` and `timestamp`, an exception's traceback under
    `exception`. With uvicorn's default they were `INFO:     Child process [23525] died`
    on stderr, which a JSON-lines collector of the merged stream (Docker's, compose's)
    could not parse: a dead worker, the event an operator most needs, was the line lost
    (operations audit, 2026-12-07). None (uvicorn's default) for console lines."""
    if not json:
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {
            "()": structlog.stdlib.ProcessorFormatter,
            "foreign_pre_chain": [structlog.stdlib.add_logger_name, structlog.processors.add_log_level,
                                  structlog.processors.TimeStamper(fmt="iso", utc=True),
                                  structlog.processors.format_exc_info],
            "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                           structlog.processors.JSONRenderer()]}},
        # logging.StreamHandler writes each line with its newline in one write (LineLogger's rule)
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
        "loggers": {"uvicorn": {"handlers": ["stdout"], "level": level.upper(), "propagate": False},
                    "uvicorn.error": {"level": level.upper()},
                    "uvicorn.access": {"handlers": ["stdout"], "level": level.upper(), "propagate": False}},
    }
