"""The validated config: plain frozen values, no mitmproxy, no I/O."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ClientType = Literal["server", "user"]
KeyType = Literal["live", "test"]
UnmatchedPolicy = Literal["deny", "allow"]


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


class ConfigError(Exception):
    """One or more problems that make a config unusable; each names file and line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: p.location)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Settings:
    default_environment: str = "production"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    client_ip_header: str = "X-Forwarded-For"
    unmatched_requests: UnmatchedPolicy = "deny"


@dataclass(frozen=True)
class Environment:
    name: str
    description: str = ""
    location: Location = Location("", 0)


@dataclass(frozen=True)
class Client:
    name: str
    networks: tuple[IPNetwork, ...]
    type: ClientType = "server"
    enabled: bool = True
    description: str = ""
    location: Location = Location("", 0)


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

    def assigned_clients(self, route: str, environment: str) -> tuple[str, ...]:
        for a in self.assignments:
            if a.route == route and a.environment == environment:
                return a.clients
        return ()
