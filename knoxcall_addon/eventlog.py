"""The event log's decision lines: one per decision, cheap when nobody reads them.

stdlib logging, logger "knoxcall": mitmdump prints it, mitmweb shows it, any handler
on that logger gets it.
"""

from __future__ import annotations

import logging

from knoxcall_addon.decision import Decision, summary_of

logger = logging.getLogger("knoxcall")

_DECISION_LINE = {"knoxcall_decision_line": True}


class _SkipLegacyLogEvents(logging.Filter):
    """Keeps per-decision lines out of mitmproxy's deprecated ``add_log`` events.

    mitmproxy turns every log record into an ``add_log`` event dispatched to every
    addon (for pre-9 addons; none of mitmproxy's own use it). One line per request
    made that a second full addon dispatch per request, ~7% of mitmdump's throughput.
    The lines still reach every logging handler: the terminal, mitmweb's event log, and
    any handler on the "knoxcall" logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "knoxcall_decision_line", False)


SKIP_LEGACY = _SkipLegacyLogEvents()


def _emit(level: int, line: str) -> None:
    """``logger.log(level, line)`` without ``findCaller``'s stack walk (a third of its cost).

    Same record to the same handlers and filters, only without a source file and line,
    which a decision line does not need. One per request, so it counts. No record is made
    when no handler would take it (see `_taken`).
    """
    if logger.isEnabledFor(level) and _taken(level):
        logger.handle(logger.makeRecord(logger.name, level, "", 0, line, (), None, extra=_DECISION_LINE))


def _taken(level: int) -> bool:
    """Would any handler see a decision line of this level? What ``Logger.callHandlers`` checks first.

    In mitmdump with ``termlog_verbosity=warn`` every handler drops an allowed request's
    INFO line (the terminal by its level, mitmproxy's error check below ERROR, the legacy
    ``add_log`` events by our filter), and the record was made for nobody: about a fifth of
    what KnoxCall costs mitmdump per request. Looked up on every call, so a handler added or
    a level changed at any time (``:set termlog_verbosity=info``) gets the next line. A
    filter on the "knoxcall" logger itself, or no handler at all (logging's last resort),
    counts as taking it: the record is then made as before.
    """
    if logger.filters:
        return True
    node: logging.Logger | None = logger
    found = False
    while node is not None:
        for handler in node.handlers:
            found = True
            if level >= handler.level and SKIP_LEGACY not in handler.filters:
                return True
        if not node.propagate:
            break
        node = node.parent  # type: ignore[assignment]
    return not found



def log_decision(decision: Decision, request_id: str) -> str:
    """Write the event log line of a decision; return it (it is also the flow's comment)."""
    line = f"{summary_of(decision)} id={request_id}"
    if decision.reason == "internal_error":
        logger.error(line)
    else:
        _emit(logging.INFO if decision.allowed else logging.WARNING, line)
    return line


_LINE_PREFIX = "knoxcall: "
_DENIED = "denied "


def flow_comment(decision: Decision, line: str) -> str:
    """The decision line with the useful words first, for mitmweb's comment column.

    mitmweb's flow list shows about 22 characters of a comment (a 150 px column) next to
    the status column, so a denial's comment starts with what the status does not say:
    ``ip_not_whitelisted 203.0.113.9 route=api env=production id=...``. An allowed flow's
    starts ``allowed client 127.0.0.9 ...``. "knoxcall: denied" said nothing there.
    """
    tail = line[len(_LINE_PREFIX) :] if line.startswith(_LINE_PREFIX) else line
    if decision.allowed or not tail.startswith(_DENIED):
        return tail
    return tail[len(_DENIED) :]
