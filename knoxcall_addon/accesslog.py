"""The access log: one JSON object per line per request, for grep, jq and log shippers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger("knoxcall")

ROTATION_CHECK_SECONDS = 1.0  # how often the path is looked at for a rotated (moved) file

ACCESS_LOG_FIELDS = (
    "ts",
    "request_id",
    "decision",
    "reason",
    "status",
    "method",
    "host",
    "path",
    "route",
    "environment",
    "client",
    "client_ip",
    "peer_ip",
    "api_key",
    "user_agent",
    "latency_ms",
    "config_version",
    "report_only",
    "rate_limit",
)


def utc_timestamp(epoch: float) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. 2026-11-27T10:00:00.123Z."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AccessLog:
    """Appends records to a file, one line each, written per line so tail -f sees them.

    Every record gets its line: what UTF-8 cannot encode is escaped (see `printable`).
    A line that cannot be written (disk full, file gone bad) is never silent, and never
    an error for the request: the first failure of a burst is logged at ERROR, and the
    first line written after it says how many were lost (so does `close`).

    Rotation: at most once a second (before a write) the path is compared with the open
    file; when logrotate has moved the file away (or it was deleted), a new file is opened
    at the path. Lines written in that second still go to the moved file, so nothing is
    lost as long as it is not compressed at once (logrotate's ``delaycompress``).
    ``copytruncate`` needs nothing (the file is opened for appending). A new file that
    cannot be opened is logged once, and lines keep going to the moved one.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open()
        self.lost = 0  # lines not written since the last one that was
        self.lost_total = 0  # lines not written since the file was opened (for /metrics)
        self._torn = False  # the last failed write may have left part of a line
        self._check_at = time.monotonic() + ROTATION_CHECK_SECONDS
        self._reopen_failed = False  # logged once until a reopen works

    def _open(self) -> Any:
        # Unbuffered bytes: each line is one write(2) (what line buffering did), and a
        # failed line leaves nothing behind in a buffer to come out later or twice.
        opened = self.path.open("ab", buffering=0)
        status = os.fstat(opened.fileno())
        self._identity = (status.st_dev, status.st_ino)
        return opened

    def follow_rotation(self) -> None:
        """Open a new file at the path when the open one was moved away or removed."""
        try:
            status = os.stat(self.path)
            if (status.st_dev, status.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass  # moved, and no new file yet (logrotate's nocreate): make it
        except OSError as e:
            self._reopen_problem(e)
            return
        try:
            new = self._open()
        except OSError as e:
            self._reopen_problem(e)
            return
        old, self._file = self._file, new
        self._torn = False  # a torn line was the old file's
        self._reopen_failed = False
        logger.info(f"knoxcall: the access log {self.path} was moved or removed (rotated); writing a new one")
        with contextlib.suppress(OSError):
            old.close()

    def _reopen_problem(self, error: OSError) -> None:
        if not self._reopen_failed:
            self._reopen_failed = True
            logger.error(
                f"knoxcall: the access log {self.path} was rotated but cannot be opened again: "
                f"{type(error).__name__}: {error}; still writing to the file it was (logged once)"
            )

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line; never raises for a failed write (see the class)."""
        line = {name: record.get(name) for name in ACCESS_LOG_FIELDS}
        text = json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n"
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # a header's non-UTF-8 byte (surrogateescape), or worse
            line = {name: printable(value) if isinstance(value, str) else value for name, value in line.items()}
            data = (json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        now = time.monotonic()
        if now >= self._check_at:
            self._check_at = now + ROTATION_CHECK_SECONDS
            self.follow_rotation()
        if self._torn:
            data = b"\n" + data  # end the torn line: it stays one bad line, not two
        try:
            self._write_all(data)
        except Exception as e:  # OSError, or ValueError on a closed file
            if not self.lost:
                logger.error(
                    f"knoxcall: cannot write the access log {self.path}: {type(e).__name__}: {e}; "
                    "lines are lost until writing works again (logged once, with the count when it does)"
                )
            self.lost += 1
            self.lost_total += 1
            return
        self._torn = False
        if self.lost:
            logger.error(f"knoxcall: the access log {self.path} is written again; {self.lost} lines were lost")
            self.lost = 0

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = self._file.write(view)
            except Exception:
                self._torn = self._torn or len(view) < len(data)
                raise
            if not written:  # None (would block) or 0: no progress, give up on the line
                self._torn = self._torn or len(view) < len(data)
                raise OSError(f"wrote {len(data) - len(view)} of {len(data)} bytes")
            view = view[written:]

    def close(self) -> None:
        if self.lost:
            logger.error(f"knoxcall: the access log {self.path} is closed; its last {self.lost} lines were lost")
            self.lost = 0
        self._file.close()


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode written as backslash escapes.

    A request's bytes that are not UTF-8 reach us as lone surrogates (surrogateescape):
    each becomes the four characters ``\\xHH`` of its byte (Python's backslashreplace of
    the bytes received); any other lone surrogate becomes ``\\udXXX``. The line stays
    plain UTF-8 JSON that every parser and log shipper reads (a JSON ``\\udcff`` escape
    would be a lone surrogate, which strict parsers refuse).
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte came from
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
