"""Logging for the whole process: a rotating log file plus stderr, with secrets redacted.

Contract:

* :func:`setup_logging` configures the root logger with a rotating file handler
  (1 MB x 5 files; each record formatted once, the file's size counted, not asked for)
  in ``platformdirs.user_log_dir(app)`` (or ``log_dir``) and a stderr handler. It is
  idempotent: a second call replaces the handlers it added before rather than adding
  more. It never fails startup because of the disk: when the log directory or file
  cannot be created, it logs to stderr only and warns. It raises :class:`LogLevelError`
  (a :class:`ValueError`) only for an unknown level name.
* Every record passing through those handlers is redacted: each string registered
  with :func:`add_secret` is replaced by ``***`` in the message, its arguments, the
  exception text and the stack text, so a token never reaches a log.
* The stderr handler looks up ``sys.stderr`` on each record, so it keeps working when
  stderr is swapped (tests) and stays silent when there is none (windowed apps).
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Final

import platformdirs

__all__ = [
    "LEVELS",
    "LogLevelError",
    "SecretFilter",
    "add_secret",
    "parse_level",
    "redact",
    "reset_logging",
    "setup_logging",
]

LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FILENAME: Final = "fedtray.log"
MAX_BYTES: Final = 1_000_000
BACKUP_COUNT: Final = 5
REDACTED: Final = "***"
FILE_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"
STDERR_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_lock = threading.Lock()
_secrets: set[str] = set()
_installed: list[logging.Handler] = []


class LogLevelError(ValueError):
    """An unknown log level name; the message lists the valid ones."""


def parse_level(name: str) -> int:
    """The numeric level for ``name`` (any case); raises :class:`LogLevelError` otherwise."""
    upper = name.strip().upper()
    if upper == "WARN":
        upper = "WARNING"
    if upper not in LEVELS:
        raise LogLevelError(f"log level must be one of {', '.join(LEVELS)}, got {name!r}")
    return int(getattr(logging, upper))


def log_level_arg(value: str) -> str:
    """An argparse ``type=`` for ``--log-level``: the upper-case name, or a usage error."""
    try:
        parse_level(value)
    except LogLevelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value.upper()


def add_secret(secret: str) -> None:
    """Register ``secret`` so that it is shown as ``***`` in every log record from now on.

    Empty strings are ignored (they would match everywhere).
    """
    if secret:
        with _lock:
            _secrets.add(secret)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    with _lock:
        # Longest first, so a secret that contains another is replaced whole.
        ordered = sorted(_secrets, key=len, reverse=True)
    for secret in ordered:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class SecretFilter(logging.Filter):
    """Rewrites a record so no registered secret survives in it; never drops a record."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        # Each handler has this filter: a record already redacted against the same
        # secrets (by the other handler) is not redacted again.
        with _lock:
            secrets = frozenset(_secrets)
        if record.__dict__.get(_REDACTED_FOR) == secrets:
            return True
        # Merge the arguments into the message first: a secret may be in either.
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record.__dict__[_REDACTED_FOR] = secrets
        return True


#: The record attribute naming the secrets it was redacted against (SecretFilter).
_REDACTED_FOR: Final = "_fedtray_redacted_for"
#: The record attribute holding its time in words (_Formatter).
_TIME_TEXT: Final = "_fedtray_asctime"


class _Formatter(logging.Formatter):
    """A formatter whose time text (the default date format) is made once per record,
    whichever handler formats it first."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        text = record.__dict__.get(_TIME_TEXT)
        if not isinstance(text, str):
            text = super().formatTime(record)
            record.__dict__[_TIME_TEXT] = text
        return text


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time; nothing when there is none."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        if stream is None:  # pythonw / windowed PyInstaller builds have no stderr
            return
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """The rotating log file (``MAX_BYTES`` x ``BACKUP_COUNT``), each record formatted once.

    The standard library's handler formats every record twice (once to decide whether to
    roll over) and seeks the file for each one; this one formats it once and asks the open
    file's size (one ``fstat``: what every process appending to the same file wrote, so
    several clients sharing a log directory still roll it over at ``MAX_BYTES``) and, like
    it, never rolls over a file that is not a regular file (``/dev/null``)."""

    def __init__(self, filename: Path, *, max_bytes: int, backup_count: int) -> None:
        super().__init__(filename, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
        self._regular: bool | None = None  # unknown until the open stream is looked at

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
            if self.stream is None:
                self.stream = self._open()
            if self.maxBytes > 0 and self._regular is not False:
                st = os.fstat(self.stream.fileno())
                self._regular = stat.S_ISREG(st.st_mode)
                if self._regular and st.st_size + len(text) >= self.maxBytes:
                    self.doRollover()
                    if self.stream is None:
                        self.stream = self._open()
            self.stream.write(text)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def reset_logging() -> None:
    """Remove and close the handlers a previous :func:`setup_logging` installed."""
    root = logging.getLogger()
    with _lock:
        handlers = list(_installed)
        _installed.clear()
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()


def setup_logging(
    level: str = "INFO", *, app: str = "fedtray", log_dir: Path | None = None
) -> Path:
    """Configure root logging to a rotating file and stderr; return the log file's path.

    When the file cannot be opened, a warning is logged, only stderr is used, and the
    returned path is where the log would have been (nothing is written there).
    """
    numeric = parse_level(level)
    directory = (
        log_dir if log_dir is not None else Path(platformdirs.user_log_dir(app, appauthor=False))
    )
    log_file = directory / LOG_FILENAME
    reset_logging()

    secret_filter = SecretFilter()
    handlers: list[logging.Handler] = []
    stderr_handler = _StderrHandler()
    stderr_handler.setFormatter(_Formatter(STDERR_FORMAT))
    handlers.append(stderr_handler)

    file_problem: OSError | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        file_handler = _RotatingFile(log_file, max_bytes=MAX_BYTES, backup_count=BACKUP_COUNT)
    except OSError as exc:
        file_problem = exc
    else:
        file_handler.setFormatter(_Formatter(FILE_FORMAT))
        handlers.append(file_handler)

    root = logging.getLogger()
    root.setLevel(numeric)
    for handler in handlers:
        handler.addFilter(secret_filter)
        root.addHandler(handler)
    with _lock:
        _installed.extend(handlers)

    if file_problem is not None:
        logging.getLogger(__name__).warning(
            "cannot write the log file %s (%s); logging to stderr only", log_file, file_problem
        )
    return log_file
