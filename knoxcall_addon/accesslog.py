"""The access log: one JSON object per line per request, for grep, jq and log shippers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

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
    "rate_limit",
)


def utc_timestamp(epoch: float) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. 2026-11-27T10:00:00.123Z."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AccessLog:
    """Appends records to a file, one line each, flushed per line so tail -f sees them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = self.path.open("a", encoding="utf-8", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        line = {name: record.get(name) for name in ACCESS_LOG_FIELDS}
        self._file.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._file.close()
