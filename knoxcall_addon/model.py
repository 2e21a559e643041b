"""The validated config: plain frozen values, no mitmproxy, no I/O."""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import itertools
import reprlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ClientType = Literal["server", "user"]
KeyType = Literal["live", "test"]
UnmatchedPolicy = Literal["deny", "allow"]
Mode = Literal["enforce", "report"]
RateLimitMode = Literal["enforce", "report"]
StoreErrorPolicy = Literal["local", "allow", "deny"]
SecretSourceKind = Literal["env", "file"]


@dataclass(frozen=True, order=True, slots=True)
class Location:
    """Where a value was written: file and 1-based line (0 when the whole file is meant)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True)
class Problem:
    location: Location
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


MESSAGE_VALUE_LIMIT = 100  # characters of a string quoted in a message (about; a list's items get less each)


class _ShortRepr(reprlib.Repr):
    """reprlib by isinstance: the loader's values are list and dict subclasses, which
    reprlib would otherwise repr in full before cutting."""

    def repr1(self, x: object, level: int) -> str:
        if isinstance(x, dict) and type(x) is not dict:
            return self.repr_dict(dict(itertools.islice(x.items(), self.maxdict + 1)), level)
        if isinstance(x, list) and type(x) is not list:
            return self.repr_list(list(x[: self.maxlist + 1]), level)
        return super().repr1(x, level)


_SHORT_SCALAR = _ShortRepr(maxstring=MESSAGE_VALUE_LIMIT, maxother=MESSAGE_VALUE_LIMIT)
_SHORT_NESTED = _ShortRepr(maxlevel=2, maxdict=3, maxlist=3, maxstring=24, maxother=24)


def shown(value: object) -> str:
    """``repr(value)`` for a message, long values elided (at most ~2 * MESSAGE_VALUE_LIMIT).

    A config value can be huge (a pasted file, a list of 100k addresses); a message
    quotes enough of it to recognise it and stays one readable line.
    """
    if type(value) is str and len(value) <= MESSAGE_VALUE_LIMIT:
        return repr(value)  # the common case, ~10x faster (the loader names every client so)
    try:
        if isinstance(value, list | dict | tuple | set | frozenset):
            return _SHORT_NESTED.repr(value)
        return _SHORT_SCALAR.repr(value)
    except ValueError:  # an int too long to print (Python refuses past 4300 digits)
        return f"<a {type(value).__name__} too long to show>"


SHOWN_CHARS = 200  # characters of a text (a message, an error) elided by ``elide``


def elide(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


def cut(text: object) -> str:
    """``str(text)`` for a message, elided in the middle past MESSAGE_VALUE_LIMIT characters."""
    text = str(text)
    if len(text) <= MESSAGE_VALUE_LIMIT:
        return text
    half = MESSAGE_VALUE_LIMIT // 2
    return f"{text[:half]}...{text[-half:]}"


def suggest(name: object, known: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the known name closest to ``name``, or '' (none is close)."""
    hint = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {shown(hint[0])}?)" if hint else ""


class ConfigError(Exception):
    """One or more problems that make a config unusable; each names file and line.

    ``secret_files``: the secret files the config names (see secretsource.py); hot reload
    watches them, since a file that appears (or is fixed) may make the config valid.
    """

    def __init__(self, problems: list[Problem], secret_files: tuple[str, ...] = (), secret_stamp: str = "") -> None:
        self.problems = sorted(problems, key=lambda p: p.location)
        self.secret_files = secret_files
        self.secret_stamp = secret_stamp  # what they held when this load read them (SecretValues.file_stamp)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Settings:
    default_environment: str = "production"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    client_ip_header: str = "X-Forwarded-For"
    unmatched_requests: UnmatchedPolicy = "deny"
    mode: Mode = "enforce"  # report: the client check logs its refusals and lets them through
    # rate limits (see ratelimit.py); the store URL may hold a password: never shown (repr=False)
    rate_limit_store: str = field(default="memory", repr=False)
    rate_limit_headers: bool = True
    rate_limit_on_store_error: StoreErrorPolicy = "local"
    rate_limit_store_timeout_ms: float = 50.0
    rate_limit_max_buckets: int = 100_000


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: capacity ``burst``, refilled at ``requests / window_sec`` per second.

    ``report``: never refuses, only says who would have been refused.
    """

    requests: int
    window_sec: float
    burst: int
    mode: RateLimitMode = "enforce"


@dataclass(frozen=True)
class SecretSource:
    """Where a secret's value is read: an environment variable, or a whole file."""

    kind: SecretSourceKind
    ref: str  # the variable's name, or the file's absolute path
    location: Location = field(default=Location("", 0), compare=False)  # where written is not what it means

    def describe(self) -> str:
        return f"environment variable {self.ref}" if self.kind == "env" else f"file {self.ref}"


@dataclass(frozen=True)
class Secret:
    """A named secret: its source, and per environment another one (values: `SecretValues`)."""

    name: str
    source: SecretSource | None = None
    environments: Mapping[str, SecretSource] = field(default_factory=dict)
    description: str = ""
    location: Location = Location("", 0)

    def source_for(self, environment: str) -> SecretSource | None:
        return self.environments.get(environment, self.source)


class SecretValues:
    """What each secret source held when the config loaded: a value, or why there is none.

    Never shown: no repr of a value, no value in equality (two loads compare by their
    fingerprints). ``file_stamp`` digests what the files held (hot reload compares it to see a
    rotated file); ``files`` are the file sources, for watching.
    """

    __slots__ = ("_read", "file_stamp", "files")

    def __init__(
        self, read: Mapping[tuple[str, str], tuple[str | None, str]] | None = None, file_stamp: str = ""
    ) -> None:
        self._read = dict(read or {})  # (kind, ref) -> (value, why there is none)
        self.file_stamp = file_stamp
        self.files = tuple(sorted(ref for kind, ref in self._read if kind == "file"))

    def value(self, source: SecretSource) -> str | None:
        return self._read.get((source.kind, source.ref), (None, "not read"))[0]

    def why_missing(self, source: SecretSource) -> str:
        return self._read.get((source.kind, source.ref), (None, "not read"))[1]

    def fingerprint(self, source: SecretSource) -> str | None:
        """The first 8 hex digits of the value's SHA-256: which version is loaded, not what it is."""
        value = self.value(source)
        return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:8] if value else None

    def __repr__(self) -> str:
        return f"SecretValues({len(self._read)} sources)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretValues):
            return NotImplemented
        return self._read.keys() == other._read.keys() and all(
            self.fingerprint(SecretSource(kind, ref)) == other.fingerprint(SecretSource(kind, ref))
            for kind, ref in self._read
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class SignatureSpec:
    """A route's signed requests: HMAC-SHA256 of the caller's request (see signing.py)."""

    required: bool = True
    tolerance_sec: int = 300
    nonce: bool = False


@dataclass(frozen=True)
class Environment:
    name: str
    description: str = ""
    location: Location = Location("", 0)
    # Declared by no file: a config without `environments` has its default one only,
    # so that a first config (a client, a route, an assignment) loads as written.
    implicit: bool = False


_RECORD = 17  # bytes per packed network: a head byte, then the address in 16 bytes
_V4 = 129  # head byte: IPv6 prefix length (0-128), or _V4 + IPv4 prefix length (129-161)


def pack_network(network: IPNetwork) -> bytes:
    """A network as one 17-byte record (see NetworkSet)."""
    head = network.prefixlen + (_V4 if network.version == 4 else 0)
    return bytes((head,)) + network.network_address.packed.rjust(16, b"\0")


class NetworkSet(Sequence[IPNetwork]):
    """A client's networks, packed in 17 bytes each.

    As ``ipaddress`` objects, 100k ranges took ~25 MB and a third of the load time.
    Reading a NetworkSet gives ``ipaddress`` networks, made on demand (lint, explain,
    ping: never per request); the range index reads the packed form via ``intervals``.
    Compares equal to the tuple of its networks.
    """

    __slots__ = ("packed",)

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self.packed = b"".join(pack_network(n) for n in networks)

    @classmethod
    def from_packed(cls, packed: bytes) -> NetworkSet:
        if len(packed) % _RECORD:
            raise ValueError("packed networks must be a whole number of records")
        result = cls.__new__(cls)
        result.packed = packed
        return result

    def __len__(self) -> int:
        return len(self.packed) // _RECORD

    def _network(self, i: int) -> IPNetwork:
        record = self.packed[i * _RECORD : (i + 1) * _RECORD]
        if record[0] >= _V4:
            return ipaddress.IPv4Network((record[13:], record[0] - _V4))
        return ipaddress.IPv6Network((record[1:], record[0]))

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return tuple(self._network(i) for i in range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("network index out of range")
        return self._network(index)

    def __iter__(self) -> Iterator[IPNetwork]:
        return (self._network(i) for i in range(len(self)))

    def intervals(self) -> Iterator[tuple[int, int, int]]:
        """(version, first address, last address + 1) of each network, as integers."""
        packed = self.packed
        for offset in range(0, len(packed), _RECORD):
            head = packed[offset]
            if head >= _V4:
                start = int.from_bytes(packed[offset + 13 : offset + _RECORD])
                yield 4, start, start + (1 << (32 - (head - _V4)))
            else:
                start = int.from_bytes(packed[offset + 1 : offset + _RECORD])
                yield 6, start, start + (1 << (128 - head))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NetworkSet):
            return self.packed == other.packed
        if isinstance(other, tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.packed)

    def __repr__(self) -> str:
        return f"NetworkSet({', '.join(str(n) for n in self)})"


@dataclass(frozen=True, slots=True)
class Client:
    name: str
    networks: NetworkSet
    type: ClientType = "server"
    enabled: bool = True
    description: str = ""
    location: Location = Location("", 0)
    rate_limit: RateLimit | None = None  # this client, over all routes and environments
    signing_secrets: tuple[str, ...] = ()  # names of secrets, any of which may sign its requests

    def __post_init__(self) -> None:
        if not isinstance(self.networks, NetworkSet):  # e.g. a tuple of ipaddress networks
            object.__setattr__(self, "networks", NetworkSet(self.networks))


@dataclass(frozen=True)
class RouteMatch:
    """Forward-proxy matching: any of ``hosts`` (``*.example.com`` allowed) and a path prefix."""

    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"


@dataclass(frozen=True)
class RouteOverride:
    """Per-environment settings of a route; None means: use the route's own."""

    target_base_url: str | None = None
    allowed_methods: frozenset[str] | None = None
    # rate limits: None uses the route's, False removes it, a RateLimit replaces it
    rate_limit: RateLimit | Literal[False] | None = None
    client_rate_limit: RateLimit | Literal[False] | None = None
    mode: Mode | None = None  # None: the route's
    # headers to inject: None uses the route's, False removes them, a mapping replaces them whole
    inject_headers: Mapping[str, str] | Literal[False] | None = None


@dataclass(frozen=True)
class Route:
    name: str
    target_base_url: str | None = None
    requires_clients: bool = True
    requires_api_key: bool = False
    enabled: bool = True
    allowed_methods: frozenset[str] | None = None
    match: RouteMatch | None = None
    environments: Mapping[str, RouteOverride] = field(default_factory=dict)
    description: str = ""
    location: Location = Location("", 0)
    rate_limit: RateLimit | None = None  # the whole route, all callers together (per environment)
    client_rate_limit: RateLimit | None = None  # each caller on this route (per environment)
    mode: Mode | None = None  # None: settings.mode
    inject_headers: Mapping[str, str] | None = None  # header name -> value, {{secret:NAME}} placeholders in it
    signature: SignatureSpec | None = None


    def mode_for(self, environment: str, default: Mode) -> Mode:
        """enforce or report here: the environment's override, else the route's, else ``default``."""
        override = self.environments.get(environment)
        if override and override.mode is not None:
            return override.mode
        return self.mode if self.mode is not None else default

    def target_for(self, environment: str) -> str | None:
        override = self.environments.get(environment)
        if override and override.target_base_url is not None:
            return override.target_base_url
        return self.target_base_url

    def methods_for(self, environment: str) -> frozenset[str] | None:
        override = self.environments.get(environment)
        if override and override.allowed_methods is not None:
            return override.allowed_methods
        return self.allowed_methods

    def rate_limit_for(self, environment: str) -> RateLimit | None:
        override = self.environments.get(environment)
        if override and override.rate_limit is not None:
            return override.rate_limit or None
        return self.rate_limit

    def client_rate_limit_for(self, environment: str) -> RateLimit | None:
        override = self.environments.get(environment)
        if override and override.client_rate_limit is not None:
            return override.client_rate_limit or None
        return self.client_rate_limit

    def inject_headers_for(self, environment: str) -> Mapping[str, str] | None:
        override = self.environments.get(environment)
        if override and override.inject_headers is not None:
            return override.inject_headers or None
        return self.inject_headers

    @property
    def requires_signature(self) -> bool:
        return self.signature is not None and self.signature.required


@dataclass(frozen=True)
class ApiKey:
    name: str
    key_sha256: bytes
    type: KeyType = "live"
    enabled: bool = True
    location: Location = Location("", 0)


@dataclass(frozen=True)
class Assignment:
    """The clients allowed on one route in one environment."""

    route: str
    environment: str
    clients: tuple[str, ...]
    location: Location = Location("", 0)


@dataclass(frozen=True)
class Config:
    settings: Settings
    environments: Mapping[str, Environment]
    clients: Mapping[str, Client]
    routes: Mapping[str, Route]
    assignments: tuple[Assignment, ...]
    api_keys: Mapping[str, ApiKey]
    version: str = ""
    folder: str = ""
    files: tuple[str, ...] = ()
    secrets: Mapping[str, Secret] = field(default_factory=dict)
    secret_values: SecretValues = field(default_factory=SecretValues, repr=False)

    def assigned_clients(self, route: str, environment: str) -> tuple[str, ...]:
        for a in self.assignments:
            if a.route == route and a.environment == environment:
                return a.clients
        return ()
