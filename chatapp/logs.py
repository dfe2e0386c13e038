"""A node's log: the protocol's ``Log`` effects, through the standard ``logging``
module, to stderr, one timestamped line each with its level.

Warnings are rate-limited (a token bucket, 5 a second after a burst of 5): a
flood of bad datagrams must fill neither the screen nor the disk. The next
warning let through says how many were left out.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from chatapp.protocol.common import Log

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
#: No level at all: the logger says nothing (a client that is not ``--verbose``).
OFF = logging.CRITICAL + 10

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class WarningRateLimit(logging.Filter):
    """Lets warnings through at ``per_second`` (after a burst as large); other levels
    always pass. The first warning let through after some were held back says so."""

    def __init__(self, per_second: float = 5.0, now: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._rate = per_second
        self._allowance = per_second
        self._now = now
        self._last = now()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or getattr(record, "summary", False):
            return True  # a summary (``Log.summary``) is limited at its source already
        now = self._now()
        self._allowance = min(self._rate, self._allowance + (now - self._last) * self._rate)
        self._last = now
        if self._allowance < 1:
            self.suppressed += 1
            return False
        self._allowance -= 1
        if self.suppressed:
            record.msg = f"{record.getMessage()} ({self.suppressed} similar lines suppressed)"
            record.args = ()
            self.suppressed = 0
        return True


class _Formatter(logging.Formatter):
    """``FORMAT``, with the time formatted once a second rather than once a line: a
    busy server logs an event per datagram, and strftime was most of a line's cost."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(DATE_FORMAT, time.localtime(second))
        return self._stamp

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.formatTime(record)} {record.levelname} {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr as it is when a line is written (so a redirection made later counts);
    a stderr that is gone loses the line, without a 'Logging error' report."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class LogSink:
    """The ``Log`` effects of one node, to the logger ``name`` (under ``chatapp``).
    ``level``: ``debug``, ``info``, ``warning``, or ``off``."""

    def __init__(
        self,
        name: str,
        *,
        level: str = "info",
        warnings_per_second: float = 5.0,
        now: Callable[[], float] = time.monotonic,
        handler: logging.Handler | None = None,
    ) -> None:
        self.logger = logging.getLogger(name)
        self.logger.setLevel(LEVELS.get(level, OFF))
        self.logger.propagate = False
        for old in list(self.logger.handlers):
            self.logger.removeHandler(old)
        if self.logger.level != OFF:
            # What the logging HOWTO's "Optimization" section advises when the records'
            # thread and process fields are not used (ours are not).
            logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
            handler = handler or _StderrHandler()
            handler.setFormatter(_Formatter())
            handler.addFilter(WarningRateLimit(warnings_per_second, now))
            self.logger.addHandler(handler)

    def __call__(self, entry: Log) -> None:
        level = LEVELS.get(entry.level, logging.INFO)
        if self.logger.isEnabledFor(level):
            # A record made here, not by Logger.log: that one looks up the caller's file
            # and line on every call, which a busy server would pay once per datagram.
            logger = self.logger
            record = logger.makeRecord(logger.name, level, "", 0, entry.text, (), None)
            if entry.summary:
                record.summary = True
            logger.handle(record)


def end_log_line() -> None:
    """End the line the terminal left open (its echo of ``^C``) before the next entry."""
    try:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
