"""Error and access logs, nginx style, reopened on USR1 so logrotate can move the files away.

Lines look like nginx's: ``2026/11/28 14:00:00 [info] 1234#0: message`` where ``#N`` is the
worker number (``#-`` for the master). One module for both processes; no rotation logic here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.INFO + 5,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "crit": logging.CRITICAL,
    "alert": logging.CRITICAL + 5,
    "emerg": logging.CRITICAL + 10,
}
EMERG = LEVELS["emerg"]
for _name, _level in LEVELS.items():
    logging.addLevelName(_level, _name)

log = logging.getLogger("modelsrv")


class _NginxFormatter(logging.Formatter):
    def __init__(self, who: str) -> None:
        super().__init__()
        self.who = who

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(record.created))
        text = f"{stamp} [{record.levelname}] {os.getpid()}#{self.who}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


_stamp_second = -1
_stamp_text = ""


def access_stamp() -> str:
    """The access log's time stamp, formatted once a second rather than once a request."""
    global _stamp_second, _stamp_text
    now = int(time.time())
    if now != _stamp_second:
        _stamp_second, _stamp_text = now, time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))
    return _stamp_text


class ReopenableFileHandler(logging.StreamHandler):
    """A file handler whose file is reopened on demand (USR1), never on its own."""

    def __init__(self, path: Path, buffering: int = 1) -> None:
        self.path = Path(path)
        self.buffering = buffering  # 1: line by line (the error log); larger: flushed by the owner
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(open(self.path, "a", buffering=buffering, encoding="utf-8"))

    def reopen(self) -> bool:
        """Open the path anew; if that fails (a directory there, no permission), keep the old file (False)."""
        self.acquire()
        try:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                stream = open(self.path, "a", buffering=self.buffering, encoding="utf-8")
            except OSError as exc:
                failed = exc
            else:
                failed = None
                old, self.stream = self.stream, stream
                old.close()
        finally:
            self.release()
        if failed is not None:
            log.error("reopening %s failed, still writing to the old file: %s", self.path, failed)
        return failed is None


class Logs:
    """The process's error log (``log``) and, in workers, the access log."""

    def __init__(self, error_log: Path, level: str, who: str, access_log: Path | None = None, stderr: bool = False):
        self.error = ReopenableFileHandler(error_log)
        self.error.setFormatter(_NginxFormatter(who))
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
        log.addHandler(self.error)
        if stderr and str(error_log) not in ("/dev/stderr", "/proc/self/fd/2", "/dev/stdout", "/proc/self/fd/1"):
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(_NginxFormatter(who))
            log.addHandler(console)
        log.setLevel(LEVELS[level])
        log.propagate = False
        # the access log is written in blocks, flushed once per turn of the event loop (one write for
        # all the lines of a batch's replies, not one per line) and when no loop runs
        self.access = ReopenableFileHandler(access_log, buffering=1 << 16) if access_log else None
        self.flush_scheduled = False

    def reopen(self) -> None:
        """Reopen every log file; "reopened logs" is logged only when all of them were."""
        ok = self.error.reopen()
        if self.access:
            ok = self.access.reopen() and ok
        if ok:
            log.info("reopened logs")

    def access_line(self, line: str) -> None:
        if self.access:
            self.access.stream.write(line + "\n")
            if not self.flush_scheduled:
                try:
                    asyncio.get_running_loop().call_soon(self.flush_access)
                except RuntimeError:  # no event loop: write it now
                    self.access.stream.flush()
                    return
                self.flush_scheduled = True

    def flush_access(self) -> None:
        self.flush_scheduled = False
        if self.access:
            try:
                self.access.stream.flush()
            except (OSError, ValueError) as exc:  # a full disk, a closed file: the lines are lost, the worker is not
                log.error("writing the access log failed: %s", exc)

    def close(self) -> None:
        log.removeHandler(self.error)
        self.error.close()
        if self.access:
            self.access.close()
