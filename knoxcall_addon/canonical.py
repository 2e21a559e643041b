"""One spelling per request: the path, host and authority a decision may be made on.

An upstream framework resolves ``/v1/%2e%2e/health``, ``2130706453`` or
``public.local:80@secret.local`` to something other than what the text says at first
sight. Rather than guess how each upstream reads them, KnoxCall takes only the one
canonical spelling of each (RFC 3986 paths without dot segments, encoded separators or
``;`` parameters; hosts in standard notation) and refuses the rest, so that what the
upstream receives is exactly what was decided on. Pure: no I/O, no mitmproxy.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

MAX_TARGET_LENGTH = 8192  # characters of path and query; longer targets are refused with 414

# Characters a canonical path may hold as they are: RFC 3986 pchar and "/" without ";"
# (path parameters, read by some servers as part of a segment and by others as not).
# Anything else, "//", a "." or ".." segment, or a "%" sends the path to the full check.
_SUSPECT = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,=:@/%]|//|/\.\.?(?:/|$)|%")
PLAIN_PATH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,=:@/")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Bytes that must never be hidden in an escape: they change how a path is cut into
# segments, or how it is decoded again (%25), in some upstream.
_STRUCTURAL_BYTES = frozenset(b"/\\.;%?#") | frozenset(range(0x20)) | {0x7F}
_STRUCTURAL_TEXT = frozenset("/\\.;%?#")


def path_problem(target: str) -> str | None:
    """None when the path of a request target (query aside) is canonical; else what is wrong.

    Canonical: starts with "/"; only RFC 3986 path characters (no ";", no "\\", no raw
    space, control or non-ASCII byte); no empty segment ("//") and no "." or ".."
    segment; percent escapes well formed, decoding to UTF-8, and never to a separator,
    a dot, "%", ";", "?", "#", a control character, or a character that Unicode
    compatibility folding turns into one of those (fullwidth solidus and the like).
    """
    path = target.partition("?")[0]
    if not path.startswith("/"):
        return "the path does not start with '/'"
    # The usual path, without the regex: only characters it lets through (no "%"), and
    # neither "//" nor "/." (which every dot segment starts with): _SUSPECT finds nothing.
    if PLAIN_PATH_CHARS.issuperset(path) and "//" not in path and "/." not in path:
        return None
    if _SUSPECT.search(path) is None:
        return None
    return _full_path_check(path)


def _full_path_check(path: str) -> str | None:
    for match in _SUSPECT.finditer(path):
        found = match.group()
        if found == "%":
            continue
        if found == "//":
            return "empty path segment ('//')"
        if found.startswith("/."):
            return "dot segment ('.' or '..')"
        return f"character {found!r} is not allowed in a path"
    if _ESCAPE.sub("", path).count("%"):
        return "malformed percent escape"
    decoded = bytes(int(m.group(1), 16) for m in _ESCAPE.finditer(path))
    if any(b in _STRUCTURAL_BYTES for b in decoded):
        return "percent-encoded separator, dot, '%', ';', '?', '#' or control character"
    try:
        text = decoded.decode("utf-8")  # refuses overlong forms such as %c0%ae
    except UnicodeDecodeError:
        return "percent escapes that are not UTF-8"
    for char in text:
        if any(c in _STRUCTURAL_TEXT for c in unicodedata.normalize("NFKC", char)):
            return f"percent-encoded {char!r}, read as a separator or dot by Unicode folding"
    return None


_PORT = re.compile(r"[1-9][0-9]{0,4}")
_REG_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)")

# host or authority as sent -> its canonical form (None: refused); see _remembered
_hosts: dict[str, str | None] = {}
_authorities: dict[str, str | None] = {}
_KEPT = 4096


def canonical_host(host: str) -> str | None:
    """The one spelling of a host name or IP literal, or None when it has no standard one.

    Lower case, no trailing dot; an IPv6 literal (with or without brackets) compressed,
    an IPv4-mapped one as its IPv4 address. A name whose last label is a number
    (``2130706453``, ``127.0.21``, ``0x7f000015``) is an IPv4 address to resolvers and
    browsers alike: it must then be a standard dotted quad.
    """
    known = _hosts.get(host, "")
    if known != "":
        return known
    return _remembered(_hosts, host, _canonical_host(host))


def _canonical_host(host: str) -> str | None:
    if not host.isascii():  # before lower(): "\u212a".lower() is "k", and the upstream gets the raw bytes
        return None
    text = host.lower()
    if text.startswith("[") and text.endswith("]"):
        return _ipv6_text(text[1:-1])
    if ":" in text:
        return _ipv6_text(text)
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > 253 or _REG_NAME.fullmatch(text) is None:
        return None
    if _NUMERIC_LABEL.fullmatch(text.rpartition(".")[2]):
        return text if _DOTTED_QUAD.fullmatch(text) else None
    return text


def _ipv6_text(text: str) -> str | None:
    if "%" in text or not text:
        return None
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


def authority_host(authority: str) -> str | None:
    """The canonical host of a Host header or ``:authority``: exactly ``host[:port]``.

    The port is 1 to 65535 in digits; the host a name, a dotted quad or a bracketed IPv6
    literal. Userinfo (``a@b``), an empty or non-numeric port, a bracketed name, a list
    of hosts: None, so that the request is refused rather than read one way here and
    another way upstream.
    """
    known = _authorities.get(authority, "")
    if known != "":
        return known
    return _remembered(_authorities, authority, _authority_host(authority))


def _authority_host(authority: str) -> str | None:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        host, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = authority.partition(":")
        port = port_text if colon else None
    if port is not None and (_PORT.fullmatch(port) is None or int(port) > 65535):
        return None
    if host.startswith("[") and ":" not in host:
        return None  # a bracketed name: only IPv6 literals go in brackets
    if not host.startswith("[") and ":" in host:
        return None
    return canonical_host(host)


def _remembered(cache: dict[str, str | None], key: str, value: str | None) -> str | None:
    """Keep a pure function's result; emptied when it holds _KEPT entries (a flood of names)."""
    if len(cache) >= _KEPT:
        cache.clear()
    cache[key] = value
    return value


_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 9110 token
_COMMON_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_problem(method: str) -> str | None:
    """None when the method is an RFC 9110 token; else what is wrong.

    Methods are case-sensitive: ``post`` is not ``POST`` to an upstream, so it is not
    allowed as ``POST`` here either (``allowed_methods`` are compared as sent).
    """
    if method in _COMMON_METHODS:  # tokens all: no regex for the usual ones
        return None
    if _METHOD.fullmatch(method) is None:
        return "the method is not an HTTP token"
    return None


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def printable(text: str) -> str:
    """``text`` safe for a terminal and a log line: what is not printable ASCII as \\xNN/\\uNNNN.

    Caller-sent values (a route name, a Host) reach the event log and mitmweb; an escape
    sequence in them must not reach the operator's terminal as one.
    """
    if text.isascii() and text.isprintable():
        return text
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)
