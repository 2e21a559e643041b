"""`knoxcall logs`: what the access log says, for an operator, on one screen (or as JSON).

Denials by reason and by route and environment, the callers refused most often with the
near-miss client and the config change that would let them in (`explain.advice`, the
same logic as `knoxcall explain`, against the config in force now), and report-only
refusals apart. Reads as a stream, in bounded memory (a 1 GB log does not need 1 GB):
lines are read one at a time (at most MAX_LINE_BYTES each), and every tally keeps at most
a fixed number of keys (`Tally`). Rotated and gzipped files are read too; ``--follow``
then prints each new refusal as it is written, across rotations.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TextIO

from knoxcall_addon.accesslog import utc_timestamp
from knoxcall_addon.decision import ALLOWED_REASONS, Decision, decide
from knoxcall_addon.explain import advice, request_for
from knoxcall_addon.ipmatch import parse_ip
from knoxcall_addon.model import ConfigError
from knoxcall_addon.policy import Policy, load_policy

MAX_LINE_BYTES = 1 << 20  # a longer line is counted unreadable and skipped, never held whole
TALLY_KEYS = 100_000  # distinct keys a tally keeps (callers, routes, reasons); counts stay exact below it
FOLLOW_POLL_SECONDS = 0.5
DURATION = re.compile(r"(\d+)\s*([smhdw])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# what a refusal that is not about the caller's address means (the address ones get advice)
HINTS = {
    "route_not_found": "no such route (or it is disabled, or the request does not fit its match)",
    "environment_not_found": "no such environment",
    "method_not_allowed": "the caller's address passed; the method is not allowed there",
    "invalid_api_key": "the API key sent is not an enabled key",
    "api_key_required": "the route requires an API key (x-knoxcall-key)",
    "test_key_not_allowed": "a test key in the default environment",
    "path_not_canonical": "a malformed request target",
    "host_invalid": "a malformed host",
    "uri_too_long": "a request target too long",
    "not_http": "raw TCP/UDP that KnoxCall cannot read",
    "rate_limited": "over a rate limit",
    "internal_error": "an internal error: see the proxy's event log",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `knoxcall logs` (cli.py makes the subparser)."""
    parser.add_argument(
        "access_log", nargs="*", metavar="ACCESS_LOG", help="access log file(s) (knoxcall_access_log); - for stdin"
    )
    parser.add_argument("--since", help="only lines newer than this: 90s, 30m, 1h, 2d, 1w, or an ISO 8601 time (UTC)")
    parser.add_argument("--route", help="only requests on this route")
    parser.add_argument("--env", help="only requests in this environment")
    parser.add_argument("--follow", action="store_true", help="then print each new refusal as it is logged")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--top", type=int, default=10, help="refused callers listed (default 10)")
    parser.add_argument(
        "--config", default="config", metavar="CONFIG_DIR", help="config for the advice (default: config)"
    )
    parser.add_argument(
        "--no-rotated", action="store_true", help="read only the files named, not their rotated siblings (FILE.1, ...)"
    )


# -- reading -------------------------------------------------------------------------------


def since_cutoff(text: str, now: float) -> str:
    """``--since`` as the access log writes a time (they compare as strings); ValueError if neither form."""
    spec = text.strip().lower()
    matches = DURATION.findall(spec)
    if matches and DURATION.sub("", spec).strip() == "":
        return utc_timestamp(now - sum(int(n) * UNITS[unit] for n, unit in matches))
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (90s, 30m, 1h, 2d, 1w) or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return utc_timestamp(moment.timestamp())


ROTATED = re.compile(r"^\.(\d+|\d{8}(\d{2,6})?|\d{4}-\d{2}-\d{2}(-\d+)?)(\.gz)?$|^-(\d{8}(\d{2,6})?)(\.gz)?$")


def files_to_read(paths: list[str], rotated: bool, since_epoch: float | None) -> list[Path]:
    """Each named file after its rotated siblings (logrotate's FILE.1, FILE.2.gz, FILE-20261130...),
    oldest first by modification time; siblings last written before ``since_epoch`` are skipped."""
    result: list[Path] = []
    for name in paths:
        path = Path(name)
        if rotated and path.parent.is_dir():
            siblings = [p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
            siblings = [p for p in siblings if ROTATED.match(p.name[len(path.name) :]) and p.is_file()]
            siblings.sort(key=lambda p: (p.stat().st_mtime, p.name))
            result += [p for p in siblings if since_epoch is None or p.stat().st_mtime >= since_epoch]
        result.append(path)
    return result


def open_log(path: Path) -> IO[bytes]:
    """The file's bytes, gunzipped when it is gzip (by its first bytes, whatever its name)."""
    raw = path.open("rb")
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def read_lines(stream: IO[bytes]) -> Iterator[bytes | None]:
    """Each line of the stream; None for one longer than MAX_LINE_BYTES (skipped, never held whole)."""
    while True:
        line = stream.readline(MAX_LINE_BYTES)
        if not line:
            return
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := stream.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield line


# -- counting ------------------------------------------------------------------------------


class Tally:
    """Counts per key in bounded memory (a frequent-items summary).

    Exact while it holds at most ``capacity`` keys. Past that it drops the less frequent
    half, subtracting the count at that point from every key kept: each count kept is then
    at most ``slack`` below the truth, and a key counted more than ``slack`` times in all
    is never lost.
    """

    def __init__(self, capacity: int = TALLY_KEYS) -> None:
        self.capacity = capacity
        self.counts: dict[Any, int] = {}
        self.slack = 0

    def add(self, key: Any) -> None:
        counts = self.counts
        if key in counts:
            counts[key] += 1
            return
        counts[key] = 1
        if len(counts) > self.capacity:
            cut = sorted(counts.values())[len(counts) // 2]
            self.slack += cut
            self.counts = {k: v - cut for k, v in counts.items() if v > cut}

    def top(self, n: int | None = None) -> list[tuple[Any, int]]:
        ranked = sorted(self.counts.items(), key=lambda item: (-item[1], str(item[0])))
        return ranked if n is None else ranked[:n]


def is_report_only(record: dict[str, Any]) -> bool:
    """Let through, but refused once enforced: report mode's ``decision: report`` or
    ``report_only: true``, or any allowed line whose reason is a refusal (e.g. a rate limit in
    report mode)."""
    decision = record.get("decision")
    return (
        decision == "report"
        or record.get("report_only") is True
        or (decision == "allowed" and record.get("reason") not in ALLOWED_REASONS)
    )


@dataclass
class Summary:
    """Everything `knoxcall logs` counts, in bounded memory."""

    route: str | None = None
    environment: str | None = None
    since: str | None = None
    lines: int = 0
    unreadable: int = 0
    allowed: int = 0
    denied: int = 0
    report_only: int = 0
    first: str | None = None
    last: str | None = None
    by_reason: Tally = field(default_factory=Tally)
    by_route: Tally = field(default_factory=Tally)
    refused: Tally = field(default_factory=Tally)  # (client_ip, route, environment, reason)
    reported: Tally = field(default_factory=Tally)
    last_seen: dict[Any, str] = field(default_factory=dict)  # pruned with the tallies

    def add_line(self, line: bytes | None) -> dict[str, Any] | None:
        """Count one line of the log; return its record when it passed the filters."""
        self.lines += 1
        if line is None:
            self.unreadable += 1
            return None
        since = self.since
        if since is not None and line.startswith(b'{"ts":"') and line[7:31].decode("ascii", "replace") < since:
            return None  # older: no need to parse it (the log's first field is its time)
        try:
            record = json.loads(line)
        except ValueError:
            self.unreadable += 1
            return None
        if not isinstance(record, dict):
            self.unreadable += 1
            return None
        return record if self.add(record) else None

    def add(self, record: dict[str, Any]) -> bool:
        ts = record.get("ts")
        if self.since is not None and not (isinstance(ts, str) and ts >= self.since):
            return False
        if (self.route is not None and record.get("route") != self.route) or (
            self.environment is not None and record.get("environment") != self.environment
        ):
            return False
        if isinstance(ts, str):
            if self.first is None or ts < self.first:
                self.first = ts
            if self.last is None or ts > self.last:
                self.last = ts
        decision = record.get("decision")
        key = (record.get("client_ip"), record.get("route"), record.get("environment"), record.get("reason"))
        if is_report_only(record):
            self.report_only += 1
            self._note(self.reported, key, ts)
        elif decision == "denied":
            self.denied += 1
            self.by_reason.add(record.get("reason"))
            self.by_route.add((record.get("route"), record.get("environment")))
            self._note(self.refused, key, ts)
        else:
            self.allowed += 1
        return True

    def _note(self, tally: Tally, key: Any, ts: Any) -> None:
        tally.add(key)
        if isinstance(ts, str):
            self.last_seen[key] = ts
        if len(self.last_seen) > 2 * TALLY_KEYS + 2:  # forget the times of keys the tallies dropped
            kept = self.refused.counts.keys() | self.reported.counts.keys()
            self.last_seen = {k: v for k, v in self.last_seen.items() if k in kept}

    def read(self, stream: IO[bytes]) -> None:
        for line in read_lines(stream):
            self.add_line(line)


# -- advice --------------------------------------------------------------------------------


class Advisor:
    """Near miss and config change for a refused caller, from the config in force now (cached)."""

    def __init__(self, policy: Policy | None) -> None:
        self.policy = policy
        self._cache: dict[tuple[Any, ...], dict[str, str]] = {}

    def __call__(self, client_ip: Any, route: Any, environment: Any, reason: Any) -> dict[str, str]:
        key = (client_ip, route, environment, reason)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= TALLY_KEYS:
                self._cache.clear()
            found = self._cache[key] = self._advise(client_ip, route, environment, reason)
        return found

    def _advise(self, client_ip: Any, route: Any, environment: Any, reason: Any) -> dict[str, str]:
        hint = HINTS.get(reason, "") if isinstance(reason, str) else ""
        if self.policy is None or not isinstance(client_ip, str) or not isinstance(route, str):
            return {"hint": hint} if hint else {}
        if reason not in ("ip_not_whitelisted", "client_not_assigned", "client_disabled"):
            return {"hint": hint} if hint else {}
        env = environment if isinstance(environment, str) else None
        now = decide_now(self.policy, client_ip, route, env)
        if now is None:
            return {"now": "the address cannot be decided again (not an IP address)"}
        if now.allowed:
            by = f"client {now.client}" if now.client else now.reason
            return {"now": f"allowed by the config in force now ({by})"}
        found = advice(self.policy, now)
        if found is None:
            return {"now": f"refused now for another reason: {now.reason}"}
        near_miss, change = found
        return {"near_miss": near_miss, "change": change}


def decide_now(policy: Policy, client_ip: str, route: str, environment: str | None) -> Decision | None:
    """The decision the config in force gives this caller on this route now (as `knoxcall explain`)."""
    if parse_ip(client_ip) is None:
        return None
    return decide(policy, request_for(policy, client_ip, route, environment))


def load_advice_policy(folder: str) -> tuple[Policy | None, str]:
    try:
        return load_policy(folder), ""
    except ConfigError as e:
        return None, f"config {folder} does not load ({len(e.problems)} problem(s)): no advice"
    except OSError as e:
        return None, f"config {folder} cannot be read ({e}): no advice"


# -- report --------------------------------------------------------------------------------


def report(summary: Summary, advisor: Advisor, files: list[str], top: int, config_note: str) -> dict[str, Any]:
    """The summary as plain data: what --format json prints and the text is made from."""

    def callers(tally: Tally) -> list[dict[str, Any]]:
        rows = []
        for (client_ip, route, environment, reason), count in tally.top(top):
            rows.append(
                {
                    "client_ip": client_ip,
                    "route": route,
                    "environment": environment,
                    "reason": reason,
                    "count": count,
                    "last_seen": summary.last_seen.get((client_ip, route, environment, reason)),
                    **advisor(client_ip, route, environment, reason),
                }
            )
        return rows

    policy = advisor.policy
    slack = max(t.slack for t in (summary.by_reason, summary.by_route, summary.refused, summary.reported))
    return {
        "files": files,
        "since": summary.since,
        "route": summary.route,
        "environment": summary.environment,
        "from": summary.first,
        "to": summary.last,
        "lines": summary.lines,
        "unreadable_lines": summary.unreadable,
        "requests": {
            "total": summary.allowed + summary.denied + summary.report_only,
            "allowed": summary.allowed,
            "denied": summary.denied,
            "report_only": summary.report_only,
        },
        "denied_by_reason": dict(summary.by_reason.top()),
        "denied_by_route": [
            {"route": route, "environment": env, "count": n} for (route, env), n in summary.by_route.top()
        ],
        "top_refused": callers(summary.refused),
        "report_only": callers(summary.reported),
        "config": {"folder": config_note} if policy is None else {"version": policy.version},
        "counts_may_be_low_by": slack,  # 0: every count is exact
    }


def render(data: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    requests = data["requests"]
    scope = [f"since {data['since']}" if data["since"] else "", f"route {data['route']}" if data["route"] else ""]
    scope.append(f"environment {data['environment']}" if data["environment"] else "")
    scoped = ", ".join(s for s in scope if s)
    lines = [
        f"access log: {', '.join(data['files']) or '-'}" + (f" ({scoped})" if scoped else ""),
        f"period: {data['from'] or '?'} .. {data['to'] or '?'}",
        f"requests: {requests['total']:,} (allowed {requests['allowed']:,}, denied {requests['denied']:,}, "
        f"report-only {requests['report_only']:,}); {data['lines']:,} lines, {data['unreadable_lines']:,} unreadable",
    ]
    if data["counts_may_be_low_by"]:
        low = data["counts_may_be_low_by"]
        lines.append(f"note: too many distinct callers to count each one: counts may be up to {low} low")
    if data["denied_by_reason"]:
        lines += ["", "denied by reason:"]
        lines += [f"  {reason:<24} {n:>10,}" for reason, n in data["denied_by_reason"].items()]
        lines += ["", "denied by route and environment:"]
        lines += [
            f"  {(row['route'] or '-') + '/' + (row['environment'] or '-'):<40} {row['count']:>10,}"
            for row in data["denied_by_route"][:20]
        ]
    config = data["config"]
    advice_from = f"config version {config['version']}" if "version" in config else config["folder"]
    for title, rows, verb in (
        (f"refused most often (advice from the {advice_from}):", data["top_refused"], "was refused"),
        ("would be refused when you enforce (report-only):", data["report_only"], "would be refused"),
    ):
        if not rows:
            continue
        lines += ["", title]
        for row in rows:
            where = f"{row['route'] or '-'}/{row['environment'] or '-'}"
            times = "once" if row["count"] == 1 else f"{row['count']:,} times"
            lines.append(f"  {row['client_ip']} {verb} {times} on {where} ({row['reason']}), last {row['last_seen']}")
            lines += [f"    {name.replace('_', ' ')}: {row[name]}" for name in ADVICE_FIELDS if name in row]
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------


def logs_command(args: argparse.Namespace, out: TextIO) -> int:
    """`knoxcall logs`: 0, or 2 for bad arguments or files that cannot be read."""
    now = time.time()
    try:
        since = since_cutoff(args.since, now) if args.since else None
    except ValueError as e:
        sys.stderr.write(f"knoxcall logs: {e}\n")
        return 2
    names = list(args.access_log) or (["-"] if not sys.stdin.isatty() else [])
    if not names:
        sys.stderr.write("knoxcall logs: name the access log (the file of knoxcall_access_log), or pipe it in\n")
        return 2
    if args.follow and "-" in names:
        sys.stderr.write("knoxcall logs: --follow needs a file, not stdin\n")
        return 2
    since_epoch = datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp() if since else None
    files = files_to_read([n for n in names if n != "-"], not args.no_rotated, since_epoch)
    summary = Summary(route=args.route, environment=args.env, since=since)
    # --follow opens the file before the summary reads it: what is written meanwhile is
    # followed (perhaps counted in the summary too), never lost between the two
    followed = _open_at_end(Path(names[-1])) if args.follow else None
    if "-" in names:
        summary.read(sys.stdin.buffer)
    try:
        for path in files:
            with open_log(path) as stream:
                summary.read(stream)
    except (OSError, EOFError) as e:
        sys.stderr.write(f"knoxcall logs: cannot read {e}\n")
        return 2
    policy, note = load_advice_policy(args.config)
    advisor = Advisor(policy)
    data = report(summary, advisor, [str(p) for p in files] + (["-"] if "-" in names else []), args.top, note)
    if args.format == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        out.write(render(data) + "\n")
    out.flush()
    if args.follow:
        follow(Path(names[-1]), summary, advisor, args.format, out, stream=followed)
    return 0


def follow(
    path: Path,
    summary: Summary,
    advisor: Advisor,
    fmt: str,
    out: TextIO,
    rounds: int | None = None,
    stream: IO[bytes] | None = None,
) -> None:
    """Print each refusal written to ``path`` from now on (one line each, or JSON lines), following
    rotation like ``tail -F``; until interrupted (or ``rounds`` polls, for callers that need an end)."""
    if fmt == "text":
        out.write(f"following {path} (Ctrl-C to stop)...\n")
        out.flush()
    try:
        for record in tail(path, rounds, stream):
            if not summary.add(record):
                continue
            denied = record.get("decision") == "denied"
            if not denied and not is_report_only(record):
                continue
            key = (record.get("client_ip"), record.get("route"), record.get("environment"), record.get("reason"))
            event = {name: record.get(name) for name in EVENT_FIELDS}
            event.update(report_only=not denied, **advisor(*key))
            out.write((json.dumps(event) if fmt == "json" else event_text(event)) + "\n")
            out.flush()
    except KeyboardInterrupt:
        pass


EVENT_FIELDS = ("ts", "request_id", "decision", "reason", "client_ip", "route", "environment")
ADVICE_FIELDS = ("near_miss", "change", "now", "hint")


def event_text(event: dict[str, Any]) -> str:
    """One refusal seen by --follow, on one line."""
    verb = "would be denied (report-only)" if event["report_only"] else "denied"
    where = f"{event['route'] or '-'}/{event['environment'] or '-'}"
    extra = "; ".join(f"{name.replace('_', ' ')}: {event[name]}" for name in ADVICE_FIELDS if name in event)
    return f"{event['ts']} {verb} {event['reason']} {event['client_ip']} on {where}" + (f": {extra}" if extra else "")


def tail(path: Path, rounds: int | None = None, stream: IO[bytes] | None = None) -> Iterator[dict[str, Any]]:
    """Records appended to ``path`` from its current end (or from where ``stream``, opened on
    it earlier, stands) on; a moved or truncated file is finished, then the new one at the
    path is read from its start."""
    if stream is None:
        stream = _open_at_end(path)
    done = 0
    partial = b""
    while rounds is None or done < rounds:
        chunk = stream.readline(MAX_LINE_BYTES) if stream is not None else b""
        if chunk:
            partial += chunk
            if partial.endswith(b"\n") or len(partial) >= MAX_LINE_BYTES:
                line, partial = partial, b""
                record = _parsed(line)
                if record is not None:
                    yield record
            continue
        done += 1
        if _replaced(path, stream):
            if stream is not None:
                stream.close()
            stream = _open(path)
            partial = b""
            continue
        time.sleep(FOLLOW_POLL_SECONDS)
    if stream is not None:
        stream.close()


def _open_at_end(path: Path) -> IO[bytes] | None:
    stream = _open(path)
    if stream is not None:
        stream.seek(0, 2)
    return stream


def _open(path: Path) -> IO[bytes] | None:
    try:
        return path.open("rb")
    except OSError:
        return None  # not there (yet): looked for again next round


def _replaced(path: Path, stream: IO[bytes] | None) -> bool:
    """Is there another file at the path than the one open, or was the open one truncated?"""
    try:
        status = path.stat()
    except OSError:
        return False  # moved, and no new file yet: keep reading the old one
    if stream is None:
        return True
    mine = os.fstat(stream.fileno())
    return (status.st_dev, status.st_ino) != (mine.st_dev, mine.st_ino) or status.st_size < stream.tell()


def _parsed(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def summarize(lines: Iterable[bytes], **filters: Any) -> Summary:
    """A Summary of raw lines (for tests and scripts that have them at hand)."""
    summary = Summary(**filters)
    for line in lines:
        summary.add_line(line)
    return summary
