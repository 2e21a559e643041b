"""Fail closed whenever KnoxCall's hooks are not in force: bad launch options, failed script reloads.

mitmproxy keeps ``--set`` values of options that no addon has declared yet and applies
them when the script's addons register; one that does not parse (``knoxcall_reload=no``,
an option given twice) makes it drop the whole script without a word, and every caller
reaches the upstream. The same happens when the ``-s`` script is reloaded after its file
changed and the new version fails to import. So:

- `check_options` (from each addon's ``load``) parses the ``knoxcall_*`` values given at
  launch the way mitmproxy is about to, before it does; a bad one is logged at ERROR with
  the option and the problem (mitmdump exits 1 at startup) and removed, so that the
  script still loads, while the proxy refuses everything.
- `LaunchGuard` lives on the master, not in the script's addon tree, so it outlives any
  reload or failure of the script. While KnoxCall has not told it that its hooks are in
  force (`activate`, `deactivate`), the guard sits at the end of mitmproxy's hook chain
  and refuses every flow.

The guard leaves the hook chain while KnoxCall is active: mitmproxy charges every chain
entry for every event of every flow, whatever hooks it has (one more entry in mitmdump's
default chain: about 3% more instructions for an HTTP flow's events, by callgrind).
KnoxCall's own hooks catch their errors.
"""

from __future__ import annotations

import difflib
import json
import logging
from typing import Any

from mitmproxy import addonmanager, connection, ctx, dns, exceptions, http, optmanager, tcp, udp
from mitmproxy.net.dns import response_codes
from mitmproxy.proxy import mode_specs, server_hooks
from mitmproxy.utils import typecheck

from knoxcall_addon.canonical import printable
from knoxcall_addon.replay import forget_key

logger = logging.getLogger("knoxcall")

GUARD_NAME = "knoxcall_guard"
OPTION_PREFIX = "knoxcall_"
REASON = "knoxcall_inactive"
STATUS = 503
BODY = {"error": "Access control inactive", "status": STATUS}
# As in proxy_addon (not imported from there: proxy_addon imports this module).
METADATA_KEY = "knoxcall"
DENIED_MARKER = ":no_entry:"
RAW_REVERSE_SCHEMES = frozenset({"tcp", "tls", "udp", "dtls", "dns"})


class LaunchGuard:
    """Refuses every flow while it is in the hook chain, i.e. while KnoxCall is not active."""

    name = GUARD_NAME

    def __init__(self, master: Any) -> None:
        self.master = master
        self.keeper: object | None = None  # the KnoxCall instance whose hooks are in force
        self.launch_errors: list[str] = []  # bad knoxcall_* options: only a restart clears them
        self.why = "KnoxCall's script did not finish loading (see the errors above)"
        self.refused = 0

    @property
    def active(self) -> bool:
        return self.keeper is not None and not self.launch_errors

    def reason(self) -> str:
        """Why the proxy refuses everything now."""
        if self.launch_errors:
            return "invalid options at launch: " + "; ".join(self.launch_errors) + " (restart with them fixed)"
        return self.why

    # -- state ---------------------------------------------------------------------------

    def open(self, keeper: object) -> None:
        """KnoxCall decides from now on: step out of the hook chain (it costs every flow)."""
        if self.keeper is None and self.refused:
            logger.info(f"knoxcall: hooks active again; {self.refused} flows were refused while they were not")
        self.keeper = keeper
        self.refused = 0
        addons = self.master.addons
        # rebound, not changed in place: mitmproxy may be iterating the old list right now
        addons.chain = [a for a in addons.chain if a is not self]

    def close(self, why: str) -> None:
        """Refuse everything from now on: back at the end of the hook chain."""
        self.keeper = None
        self.why = why
        addons = self.master.addons
        if not any(a is self for a in addons.chain):
            addons.chain = [*addons.chain, self]

    def refuse_launch(self, problem: str) -> None:
        """An option given at launch is invalid: log it (mitmdump exits at startup) and refuse for good."""
        self.launch_errors.append(problem)
        logger.error(f"knoxcall: {problem}; refusing every request until restarted with valid knoxcall options")
        self.close(self.why)

    def check_unknown(self) -> None:
        """``knoxcall_*`` options given at launch that no loaded addon declared are errors."""
        options = self.master.options
        unknown = [n for n in options.deferred if n.startswith(OPTION_PREFIX) and n not in options]
        if not unknown:
            return
        known = sorted(n for n in options.keys() if n.startswith(OPTION_PREFIX))  # noqa: SIM118 (no __iter__)
        for name in unknown:
            del options.deferred[name]  # reported once
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.refuse_launch(f"unknown option {name}{hint}; the options are {', '.join(known)}")

    # -- hooks: only called while in the chain, i.e. while refusing ---------------------------

    def running(self) -> None:
        """Startup is over and KnoxCall is not active: an ERROR now makes mitmdump exit 1."""
        options = self.master.options
        # mitmproxy stops applying --set values at the first that fails, and drops the script
        # being registered, silently: say which
        stuck = [p for n, v in options.deferred.items() if n in options and (p := _problem(options, n, v))]
        also = f"; mitmproxy could not apply {'; '.join(stuck)}" if stuck else ""
        logger.error(
            f"knoxcall: KnoxCall's hooks are not active at startup ({self.reason()}{also}); refusing every request"
        )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.error is None:
            request = flow.request
            self._refuse_http(flow, f"{request.method} {request.pretty_host}{request.path}")

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.error is None:
            self._refuse_http(flow, f"CONNECT {flow.request.pretty_host}:{flow.request.port}")

    def client_connected(self, client: connection.Client) -> None:
        """Raw reverse modes (reverse:tcp, :udp, :dns...) carry no request to answer: close at once."""
        mode = client.proxy_mode
        if isinstance(mode, mode_specs.ReverseMode) and mode.scheme in RAW_REVERSE_SCHEMES:
            self._log(f"a {mode.scheme} connection", client.peername)
            client.error = f"knoxcall: connection refused ({REASON})"

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """No upstream connection at all: also covers tunnels and raw flows no other hook sees."""
        if data.server.error is None:
            self._log(f"an upstream connection to {data.server.address}", data.client.peername)
            data.server.error = f"knoxcall: upstream connection refused ({REASON})"

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._refuse_raw(flow, "a TCP flow")

    def udp_start(self, flow: udp.UDPFlow) -> None:
        self._refuse_raw(flow, "a UDP flow")

    def dns_request(self, flow: dns.DNSFlow) -> None:
        # also over an answer that mitmproxy's resolver (earlier in the chain) has made
        self._annotate(flow)
        self._log("a DNS query", flow.client_conn.peername)
        flow.response = flow.request.fail(response_codes.REFUSED)

    # -- internals -----------------------------------------------------------------------

    def _refuse_http(self, flow: http.HTTPFlow, what: str) -> None:
        """A 503 JSON answer; a streamed body cannot be answered, so then the flow is killed.
        Its API key header goes, as from every refused request (mitmweb would show it)."""
        forget_key(flow.request)
        self._annotate(flow)
        self._log(printable(what), flow.client_conn.peername)  # the caller's method, host and path
        if (flow.request.stream or getattr(ctx.options, "stream_large_bodies", None)) and flow.killable:
            flow.kill()
            return
        content = b"" if flow.request.method.upper() == "HEAD" else json.dumps(BODY).encode()
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        flow.response = http.Response.make(STATUS, content, headers)

    def _refuse_raw(self, flow: tcp.TCPFlow | udp.UDPFlow, what: str) -> None:
        self._annotate(flow)
        self._log(what, flow.client_conn.peername)
        if flow.killable:
            flow.kill()  # mitmproxy may ignore this at *_start; server_connect refuses the server

    def _annotate(self, flow: Any) -> None:
        """The flow (and KnoxCall's access log line, if it decided first) says what happened."""
        meta = flow.metadata.get(METADATA_KEY)
        if isinstance(meta, dict):
            meta.update(decision="denied", reason=REASON, status=STATUS)
        else:
            flow.metadata[METADATA_KEY] = {"decision": "denied", "reason": REASON, "status": STATUS}
        flow.comment = f"knoxcall: denied {REASON}: {self.reason()}"
        flow.marked = DENIED_MARKER

    def _log(self, what: str, peername: Any) -> None:
        self.refused += 1
        peer = peername[0] if peername else "?"
        logger.error(f"knoxcall: refused {what} from {peer}: {REASON} ({self.reason()})")


def guard_of(master: Any) -> LaunchGuard:
    """The master's guard; made (refusing, at the end of the chain) by the first KnoxCall to load."""
    existing = master.addons.get(GUARD_NAME)
    if existing is not None:
        return existing
    guard = LaunchGuard(master)
    options = master.options
    # add() applies the pending --set values: not from inside a load hook, not before they are checked
    held = dict(options.deferred)
    options.deferred.clear()
    try:
        master.addons.add(guard)
    finally:
        options.deferred.update(held)
    return guard


def check_options(loader: addonmanager.Loader) -> LaunchGuard:
    """Check the ``knoxcall_*`` values given at launch of the options declared so far (call after add_option).

    Parsed exactly as mitmproxy's ``process_deferred`` is about to, which drops the whole
    script on the first failure. A bad value is logged and removed, and the guard refuses.
    """
    guard = guard_of(loader.master)
    options = loader.master.options
    for name in [n for n in options.deferred if n.startswith(OPTION_PREFIX) and n in options]:
        problem = _problem(options, name, options.deferred[name])
        if problem is not None:
            del options.deferred[name]
            guard.refuse_launch(problem)
    return guard


def _problem(options: optmanager.OptManager, name: str, value: Any) -> str | None:
    """What is wrong with a pending value of a declared option, in one line; None when nothing."""
    option = options._options[name]
    if not isinstance(value, optmanager._UnconvertedStrings):  # from mitmproxy's config.yaml: typed
        try:
            typecheck.check_option_type(name, value, option.typespec)
        except TypeError as e:
            return f"option {name}: {e}"
        return None
    given = value.val  # from --set: every value given, as strings
    try:
        options._parse_setval(option, given)
    except exceptions.OptionsError as e:
        if len(given) > 1:
            shown = ", ".join(f"--set {name}={v}" for v in given)
            return f"{name} is given {len(given)} times ({shown}); give it once"
        spec = f"--set {name}={given[0]}" if given else f"--set {name}"
        return f"{spec}: {str(e).removeprefix(f'Failed to parse option {name}: ').rstrip('.')}"
    return None


def activate(addon: object) -> None:
    """``addon`` (KnoxCall) has a policy in force: it decides, unless the launch was invalid.

    Only an addon whose hooks are in the hook chain counts (``script.run`` configures copies that are not).
    """
    master = getattr(ctx, "master", None)
    if master is None:  # no mitmproxy here (a library caller): nothing to guard
        return
    guard = guard_of(master)
    guard.check_unknown()
    if guard.launch_errors or guard.keeper is addon:
        return
    if any(carries(a, addon) for a in addonmanager.traverse(master.addons.chain)):
        guard.open(addon)


def carries(node: object, addon: object) -> bool:
    """Is ``node`` (in mitmproxy's addon tree) ``addon``, or a module holding its hooks (hooktable)?"""
    return node is addon or getattr(getattr(node, "requestheaders", None), "__self__", None) is addon


def deactivate(addon: object) -> None:
    """``addon`` is leaving the hook chain (reload, removal, shutdown): refuse until another is active."""
    master = getattr(ctx, "master", None)
    guard = master.addons.get(GUARD_NAME) if master is not None else None
    if guard is not None and guard.keeper is addon:
        guard.close("KnoxCall stopped: its script was reloaded and failed to load, was removed, or mitmproxy exits")


def status_lines(addon: object) -> list[str]:
    """For ``knoxcall.status``: nothing while ``addon`` decides, else that and why everything is refused."""
    master = getattr(ctx, "master", None)
    guard = master.addons.get(GUARD_NAME) if master is not None else None
    if guard is None:
        return ["knoxcall: NOT ACTIVE: the guard is missing; mitmproxy may forward requests undecided"]
    if guard.active and guard.keeper is addon:
        return []
    return [f"knoxcall: NOT ACTIVE, every request is refused: {guard.reason()}"]


def scripts_before(addon: object) -> list[str]:
    """The ``-s`` scripts that mitmproxy runs before the one holding ``addon``.

    mitmproxy runs the scripts' hooks one after the other inside one error handler: a
    hook of an earlier script that raises skips every later script's hook for that
    event, KnoxCall's included, and the request goes on undecided. Empty when ``addon``
    was not loaded as a script (tests, ``script.run``).
    """
    master = getattr(ctx, "master", None)
    loader = master.addons.get("scriptloader") if master is not None else None
    before: list[str] = []
    for script in getattr(loader, "addons", ()):
        module = getattr(script, "ns", None)
        if module is not None and (carries(module, addon) or any(a is addon for a in getattr(module, "addons", ()))):
            return before
        before.append(str(getattr(script, "path", script)))
    return []


def script_order_problem(addon: object) -> str | None:
    """What is wrong with the order of the ``-s`` scripts, if anything (see scripts_before)."""
    before = scripts_before(addon)
    if not before:
        return None
    return (
        f"knoxcall: the script(s) {', '.join(before)} run before KnoxCall's: a hook of theirs that raises "
        "would make mitmproxy skip KnoxCall's for that request, which would go on undecided; "
        "give -s knoxcall_addon/addon.py first"
    )
