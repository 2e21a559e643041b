"""Validate the config folder into a `Config`, or fail with every problem found.

One code path for the addon, the hot reload and the ``knoxcall`` CLI. Every problem
names file, line and what is wrong; nothing is guessed or silently dropped.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from knoxcall_addon import secretsource
from knoxcall_addon.model import (
    ApiKey,
    Assignment,
    Client,
    Config,
    ConfigError,
    Environment,
    Location,
    NetworkSet,
    Problem,
    Route,
    RouteMatch,
    RouteOverride,
    Settings,
    cut,
    shown,
    suggest,
)
from knoxcall_addon.networks import pack_networks, pack_plain_network
from knoxcall_addon.rateconfig import RATE_LIMIT_SETTINGS, read_rate_limit, read_rate_limit_settings
from knoxcall_addon.signing import read_signature
from knoxcall_addon.yamlsource import LocatedDict, LocatedList, check_folder, elide, read_folder

ENVIRONMENT_NAME = re.compile(r"^[a-z0-9_-]+$")
OBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
METHOD = re.compile(r"^[A-Z]+$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

TOP_LEVEL_KEYS = ("settings", "environments", "clients", "routes", "assignments", "api_keys", "secrets")
SETTINGS_KEYS = ("default_environment", "trusted_proxies", "client_ip_header", "unmatched_requests", "mode")
SETTINGS_KEYS += RATE_LIMIT_SETTINGS
ENVIRONMENT_KEYS = ("name", "description")
CLIENT_KEYS = ("name", "type", "ip_address", "enabled", "description", "rate_limit", "signing_secrets")
ROUTE_KEYS = (
    "name",
    "target_base_url",
    "requires_clients",
    "requires_api_key",
    "enabled",
    "allowed_methods",
    "match",
    "environments",
    "description",
    "rate_limit",
    "client_rate_limit",
    "mode",
    "inject_headers",
    "signature",
)
MATCH_KEYS = ("hosts", "path_prefix")
MODES = ("enforce", "report")
OVERRIDE_KEYS = ("target_base_url", "allowed_methods", "rate_limit", "client_rate_limit", "mode", "inject_headers")
API_KEY_KEYS = ("name", "key_sha256", "type", "enabled", "description")

_MISSING = object()
MESSAGE_CHARS = 1000  # a problem's message is cut after this many characters


def load_config(folder: str | Path) -> Config:
    """Read, validate and return the config in ``folder``; raise ConfigError otherwise."""
    path = check_folder(folder)
    sources, version = read_folder(path, reuse=True)
    if not sources:
        where = Location(os.path.abspath(path), 0)
        raise ConfigError([Problem(where, "no config files (*.yaml, *.yml) in this folder")])
    builder = _Builder()
    for source in sources:
        builder.add_file(source.data, str(source.path), source.text)
    config = builder.build(version=version, folder=str(path), files=tuple(str(s.path) for s in sources))
    return config


class _Builder:
    """Collects the files' sections, then validates them into one Config."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.settings: dict[str, tuple[Any, Location]] = {}
        self.lists: dict[str, list[tuple[Any, Location]]] = {
            "environments": [],
            "clients": [],
            "routes": [],
            "api_keys": [],
            "secrets": [],
        }
        self.assignments: dict[str, tuple[Any, Location]] = {}

    # -- helpers ---------------------------------------------------------------------

    def error(self, where: Location, message: str) -> None:
        # Values are quoted with `shown`; this bounds what else a message may carry (long names).
        self.problems.append(Problem(where, elide(message, MESSAGE_CHARS)))

    def check_keys(self, mapping: LocatedDict, allowed: tuple[str, ...], what: str) -> None:
        for key in mapping:
            if key not in allowed:
                self.error(
                    mapping.where(key),
                    f"unknown key {shown(key)} in {what}{suggest(key, allowed)}; allowed: {', '.join(allowed)}",
                )

    def field(
        self,
        mapping: LocatedDict,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = _MISSING,
        what: str = "",
    ) -> Any:
        """The value of ``key`` if it has the right type; a recorded problem otherwise."""
        if key not in mapping:
            if default is _MISSING:
                self.error(mapping.location, f"{what} is missing required key {shown(key)}")
                return None
            return default
        value = mapping[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; never accept one for the other.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(_type_name(k) for k in kinds)
            self.error(
                mapping.where(key),
                f"{what}: {shown(key)} must be {names}, not {_type_name(type(value))} ({shown(value)})",
            )
            return None
        return value

    def rate_limit(self, entry: LocatedDict, key: str, what: str, allow_false: bool = False) -> Any:
        """``entry[key]`` as a RateLimit, None, or (in an environment override) False; see rateconfig."""
        limit, problems = read_rate_limit(entry, key, what, allow_false=allow_false)
        self.problems.extend(problems)
        return limit

    def checked(self, read: tuple[Any, list[Problem]]) -> Any:
        """The value of a reader that returns (value, problems) (secretsource, signing); problems noted."""
        return self.problems.extend(read[1]) or read[0]

    def name_field(self, entry: LocatedDict, what: str, pattern: re.Pattern[str]) -> str | None:
        name = self.field(entry, "name", str, what=what)
        if name is None:
            return None
        if not pattern.match(name):
            self.error(entry.where("name"), f"{what} name {shown(name)} must match {pattern.pattern}")
            return None
        return name

    # -- collecting ------------------------------------------------------------------

    def add_file(self, data: Any, file: str, text: str | None = None) -> None:
        if data is None:
            return
        if not isinstance(data, LocatedDict):
            self.error(Location(file, 1), "the file must be a mapping with keys " + ", ".join(TOP_LEVEL_KEYS))
            return
        self.check_keys(data, TOP_LEVEL_KEYS, "the top level")
        if text is None or secretsource.MARK in text:  # (one search of the text: most files name no secret)
            self.problems.extend(secretsource.stray_placeholders(data))
        for section in ("settings", "assignments"):
            if section not in data:
                continue
            value = data[section]
            if value is None:
                continue
            if not isinstance(value, LocatedDict):
                self.error(data.where(section), f"{shown(section)} must be a mapping")
                continue
            merged = self.settings if section == "settings" else self.assignments
            for key, item, where in value.located_items():
                if key in merged:
                    self.error(where, f"{section}.{cut(key)} is defined twice (first at {merged[key][1]})")
                    continue
                merged[key] = (item, where)
        for section, entries in self.lists.items():
            if section not in data or data[section] is None:
                continue
            value = data[section]
            if not isinstance(value, LocatedList):
                self.error(data.where(section), f"{shown(section)} must be a list")
                continue
            entries.extend(zip(value, value.item_locations, strict=True))

    # -- validating ------------------------------------------------------------------

    def build(self, version: str, folder: str, files: tuple[str, ...]) -> Config:
        self.folder = folder
        environments = self._named(self.lists["environments"], "environment", self._environment)
        if not self.lists["environments"]:
            environments = self._implicit_environment()
        clients = self._named(self.lists["clients"], "client", self._client)
        routes = self._named(self.lists["routes"], "route", lambda e, n: self._route(e, n, environments))
        api_keys = self._named(self.lists["api_keys"], "API key", self._api_key)
        settings = self._settings(environments)
        assignments = self._assignments(environments, clients, routes)
        config = Config(
            settings=settings,
            environments=environments,
            clients=clients,
            routes=routes,
            assignments=assignments,
            api_keys=api_keys,
            version=version,
            folder=folder,
            files=files,
        )
        # the secrets, read now; every {{secret:NAME}} must name one with a value where it is in force
        store_where = self.settings.get("rate_limit_store", (None, None))[1]
        config = secretsource.with_secrets(config, self.lists["secrets"], self.problems, store_where)
        if self.problems:
            raise ConfigError(self.problems, config.secret_values.files, config.secret_values.file_stamp)
        return config

    def _named(
        self,
        entries: list[tuple[Any, Location]],
        what: str,
        make: Callable[[LocatedDict, str], Any],
    ) -> dict[str, Any]:
        pattern = ENVIRONMENT_NAME if what == "environment" else OBJECT_NAME
        result: dict[str, Any] = {}
        first_seen: dict[str, Location] = {}
        for entry, where in entries:
            if not isinstance(entry, LocatedDict):
                self.error(where, f"each {what} must be a mapping with a 'name'")
                continue
            name = self.name_field(entry, what, pattern)
            if name is None:
                continue
            if name in first_seen:
                first = first_seen[name]
                self.error(entry.where("name"), f"{what} {shown(name)} is defined twice (first at {first})")
                continue
            first_seen[name] = entry.location
            # An entry with problems keeps its name (as None) so that references to it
            # do not add a second, misleading "unknown name" error.
            result[name] = make(entry, name)
        return result

    def _implicit_environment(self) -> dict[str, Environment]:
        """No file declares an environment: the default one exists on its own (a declared
        list, even of one, is taken as the whole truth and must name the default)."""
        name = self.settings.get("default_environment", (Settings().default_environment, None))[0]
        if not isinstance(name, str) or not ENVIRONMENT_NAME.match(name):
            return {}  # _settings says what is wrong with it
        where = Location(self.folder, 0)
        return {name: Environment(name, "implicit: no environments are declared", where, implicit=True)}

    def _settings(self, environments: dict[str, Environment]) -> Settings:
        for key, (_, where) in self.settings.items():
            if key not in SETTINGS_KEYS:
                self.error(where, f"unknown key {shown(key)} in settings{suggest(key, SETTINGS_KEYS)}")
        values = {k: v for k, (v, _) in self.settings.items()}
        where = {k: loc for k, (_, loc) in self.settings.items()}
        defaults = Settings()

        default_env = values.get("default_environment", defaults.default_environment)
        if not isinstance(default_env, str):
            self.error(
                where["default_environment"],
                f"settings.default_environment must be a string, not {_type_name(type(default_env))}",
            )
            default_env = defaults.default_environment
        elif not self.lists["environments"] and not ENVIRONMENT_NAME.match(default_env):
            self.error(
                where["default_environment"],
                f"settings.default_environment {shown(default_env)} must match {ENVIRONMENT_NAME.pattern}",
            )
        elif default_env not in environments:
            self.error(
                where.get("default_environment", Location(self._first_file(), 0)),
                f"default environment {shown(default_env)} is not defined under 'environments'",
            )

        header = values.get("client_ip_header", defaults.client_ip_header)
        if not isinstance(header, str) or not re.match(r"^[A-Za-z0-9-]+$", header):
            self.error(
                where["client_ip_header"],
                f"settings.client_ip_header must be a header name (letters, digits, '-'), not {shown(header)}",
            )
            header = defaults.client_ip_header

        unmatched = values.get("unmatched_requests", defaults.unmatched_requests)
        if unmatched not in ("deny", "allow"):
            self.error(
                where["unmatched_requests"],
                f"settings.unmatched_requests must be 'deny' or 'allow', not {shown(unmatched)}",
            )
            unmatched = "deny"

        proxies = NetworkSet()
        if "trusted_proxies" in values:
            proxies = self._networks(values["trusted_proxies"], where["trusted_proxies"], "trusted_proxies")
        mode = values.get("mode", defaults.mode)
        if mode not in MODES:
            self.error(where["mode"], f"settings.mode must be 'enforce' or 'report', not {shown(mode)}")
            mode = defaults.mode
        rate_limit_settings, problems = read_rate_limit_settings(values, where)
        self.problems.extend(problems)
        return Settings(
            default_environment=default_env,
            trusted_proxies=tuple(proxies),
            client_ip_header=header,
            unmatched_requests=unmatched,
            mode=mode,
            **rate_limit_settings,
        )

    def _first_file(self) -> str:
        """A file to name for a problem of the config as a whole (e.g. no environments)."""
        for entries in [*self.lists.values(), self.settings.values(), self.assignments.values()]:
            for _, where in entries:
                return where.file
        return self.folder

    def _networks(self, value: Any, where: Location, what: str) -> NetworkSet:
        """An IP, a CIDR, a comma-separated string of them, or a YAML list of those."""
        if value is None:
            return NetworkSet()
        if isinstance(value, str):
            parts: list[Any] = [value]
        elif isinstance(value, LocatedList):
            parts = value
        else:
            self.error(where, f"{what} must be an IP, a CIDR, a comma-separated string or a list{_quote_hint(value)}")
            return NetworkSet()
        packed: list[bytes] = []
        for i, part in enumerate(parts):
            # the common case first: one plain address or CIDR (no Location made for it)
            if isinstance(part, str) and (fast := pack_plain_network(part)) is not None:
                packed.append(fast)
                continue
            part_where = value.where(i) if parts is value else where
            if not isinstance(part, str):
                self.error(part_where, f"{what}: {shown(part)} must be a string like '10.0.0.0/8'{_quote_hint(part)}")
                continue
            try:
                packed.append(pack_networks(part, part_where))
            except ConfigError as e:
                self.problems.extend(e.problems)
        return NetworkSet.from_packed(b"".join(packed))

    def _environment(self, entry: LocatedDict, name: str) -> Environment:
        self.check_keys(entry, ENVIRONMENT_KEYS, f"environment {shown(name)}")
        description = self.field(entry, "description", str, "", f"environment {shown(name)}")
        return Environment(name=name, description=description or "", location=entry.location)

    def _client(self, entry: LocatedDict, name: str) -> Client | None:
        what = f"client {shown(name)}"
        self.check_keys(entry, CLIENT_KEYS, what)
        client_type = self.field(entry, "type", str, "server", what)
        if client_type not in ("server", "user", None):
            self.error(entry.where("type"), f"{what}: type must be 'server' or 'user', not {shown(client_type)}")
        enabled = self.field(entry, "enabled", bool, True, what)
        description = self.field(entry, "description", str, "", what)
        if "ip_address" not in entry:
            self.error(entry.location, f"{what} is missing required key 'ip_address'")
            return None
        networks = self._networks(entry["ip_address"], entry.where("ip_address"), what)
        if not networks:
            if entry["ip_address"] in (None, "") or entry["ip_address"] == []:
                self.error(entry.where("ip_address"), f"{what} has no IP addresses")
            return None
        return Client(
            name=name,
            networks=networks,
            type=client_type if client_type in ("server", "user") else "server",
            enabled=bool(enabled) if enabled is not None else True,
            description=description or "",
            location=entry.location,
            rate_limit=self.rate_limit(entry, "rate_limit", what),
            signing_secrets=self.checked(secretsource.read_signing_secrets(entry, what)),
        )

    def _methods(self, entry: LocatedDict, what: str) -> frozenset[str] | None:
        if "allowed_methods" not in entry:
            return None
        value = entry["allowed_methods"]
        where = entry.where("allowed_methods")
        if not isinstance(value, LocatedList) or not value:
            self.error(where, f"{what}: allowed_methods must be a non-empty list like [GET, POST]")
            return None
        methods = set()
        for method in value:
            if not isinstance(method, str) or not METHOD.match(method.upper()):
                self.error(where, f"{what}: {shown(method)} is not an HTTP method")
                continue
            methods.add(method.upper())
        return frozenset(methods)

    def _target(self, entry: LocatedDict, what: str) -> str | None:
        target = self.field(entry, "target_base_url", str, None, what)
        if target is None:
            return None
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            self.error(
                entry.where("target_base_url"),
                f"{what}: target_base_url {shown(target)} must be an http(s) URL with a host and no query",
            )
            return None
        try:
            port = parts.port  # raises on a port that is not a number in 0-65535
        except ValueError:
            port = 0
        if port == 0:  # port 0 would silently become the scheme's default port
            self.error(entry.where("target_base_url"), f"{what}: bad port in {shown(target)}")
            return None
        if parts.username is not None or parts.password is not None:
            # They would be dropped silently (the request is re-targeted by host and port),
            # and a secret does not belong in the config.
            self.error(
                entry.where("target_base_url"),
                f"{what}: target_base_url must not contain credentials (user:password@)",
            )
            return None
        return target

    def _match(self, entry: LocatedDict, what: str) -> RouteMatch | None:
        value = self.field(entry, "match", LocatedDict, None, what)
        if value is None:
            return None
        self.check_keys(value, MATCH_KEYS, f"{what} match")
        hosts: list[str] = []
        raw_hosts = self.field(value, "hosts", LocatedList, LocatedList(), f"{what} match")
        for host, where in zip(raw_hosts or [], getattr(raw_hosts, "item_locations", []), strict=False):
            if not isinstance(host, str) or not HOST_PATTERN.match(host.lower().rstrip(".")):
                self.error(where, f"{what}: {shown(host)} is not a host name (a leading '*.' is allowed)")
                continue
            hosts.append(host.lower().rstrip("."))
        prefix = self.field(value, "path_prefix", str, "/", f"{what} match")
        if prefix is not None and not prefix.startswith("/"):
            self.error(value.where("path_prefix"), f"{what}: path_prefix must start with '/'")
            prefix = None
        elif prefix is not None and (normal := _normal_prefix(prefix)) != (prefix.rstrip("/") or "/"):
            # Requests are matched decoded and normalised (policy.normalize_path): a prefix
            # written otherwise would silently never match.
            self.error(
                value.where("path_prefix"),
                f"{what}: path_prefix {shown(prefix)} can never match, since request paths are matched "
                f"percent-decoded and normalised; write {shown(normal)}",
            )
            prefix = None
        if prefix is None:
            return None
        prefix = prefix.rstrip("/") or "/"  # "/v1/" is "/v1"; "//" is "/", not ""
        return RouteMatch(hosts=tuple(hosts), path_prefix=prefix)

    def _route(self, entry: LocatedDict, name: str, environments: dict[str, Environment]) -> Route:
        what = f"route {shown(name)}"
        self.check_keys(entry, ROUTE_KEYS, what)
        overrides: dict[str, RouteOverride] = {}
        raw_overrides = self.field(entry, "environments", LocatedDict, None, what)
        for env_name, override, where in raw_overrides.located_items() if raw_overrides else ():
            if env_name not in environments:
                self.error(where, f"{what}: {_unknown_environment(env_name, environments)}")
                continue
            if not isinstance(override, LocatedDict):
                self.error(where, f"{what}: the override for {shown(env_name)} must be a mapping")
                continue
            self.check_keys(override, OVERRIDE_KEYS, f"{what} environment {shown(env_name)}")
            label = f"{what} ({cut(env_name)})"
            overrides[env_name] = RouteOverride(
                target_base_url=self._target(override, label),
                allowed_methods=self._methods(override, label),
                rate_limit=self.rate_limit(override, "rate_limit", label, True),
                client_rate_limit=self.rate_limit(override, "client_rate_limit", label, True),
                mode=self._mode(override, label),
                inject_headers=self.checked(secretsource.read_inject_headers(override, label, allow_false=True)),
            )
        return Route(
            name=name,
            target_base_url=self._target(entry, what),
            requires_clients=self.field(entry, "requires_clients", bool, True, what) is not False,
            requires_api_key=self.field(entry, "requires_api_key", bool, False, what) is True,
            enabled=self.field(entry, "enabled", bool, True, what) is not False,
            allowed_methods=self._methods(entry, what),
            match=self._match(entry, what),
            environments=overrides,
            description=self.field(entry, "description", str, "", what) or "",
            location=entry.location,
            rate_limit=self.rate_limit(entry, "rate_limit", what),
            client_rate_limit=self.rate_limit(entry, "client_rate_limit", what),
            mode=self._mode(entry, what),
            inject_headers=self.checked(secretsource.read_inject_headers(entry, what)),
            signature=self.checked(read_signature(entry, what)),
        )

    def _mode(self, entry: LocatedDict, what: str) -> Any:
        """``mode`` of a route or an override: enforce, report, or None (not set: inherited)."""
        mode = entry.get("mode")
        if mode is not None and mode not in MODES:
            self.error(entry.where("mode"), f"{what}: mode must be 'enforce' or 'report', not {shown(mode)}")
            return None
        return mode

    def _api_key(self, entry: LocatedDict, name: str) -> ApiKey | None:
        what = f"API key {shown(name)}"
        self.check_keys(entry, API_KEY_KEYS, what)
        digest = self.field(entry, "key_sha256", str, what=what)
        key_type = self.field(entry, "type", str, "live", what)
        if key_type not in ("live", "test", None):
            self.error(entry.where("type"), f"{what}: type must be 'live' or 'test', not {shown(key_type)}")
        enabled = self.field(entry, "enabled", bool, True, what)
        self.field(entry, "description", str, "", what)
        if digest is None:
            return None
        if not SHA256_HEX.match(digest.lower()):
            self.error(
                entry.where("key_sha256"),
                f"{what}: key_sha256 must be 64 hex digits (the SHA-256 of the key, never the key itself)",
            )
            return None
        return ApiKey(
            name=name,
            key_sha256=bytes.fromhex(digest),
            type="test" if key_type == "test" else "live",
            enabled=enabled is not False,
            location=entry.location,
        )

    def _assignments(
        self,
        environments: dict[str, Environment],
        clients: dict[str, Client],
        routes: dict[str, Route],
    ) -> tuple[Assignment, ...]:
        result: list[Assignment] = []
        for route_name, (per_env, where) in self.assignments.items():
            if route_name not in routes:
                self.error(where, f"assignments: unknown route {shown(route_name)}{suggest(route_name, routes)}")
                continue
            if per_env is None:
                continue
            if not isinstance(per_env, LocatedDict):
                self.error(where, f"assignments.{cut(route_name)} must map environments to lists of clients")
                continue
            for env_name, names, env_where in per_env.located_items():
                at = f"assignments.{cut(route_name)}.{cut(env_name)}"
                if env_name not in environments:
                    self.error(
                        env_where, f"assignments.{cut(route_name)}: {_unknown_environment(env_name, environments)}"
                    )
                    continue
                names_list = [] if names is None else _one_or_list(names, env_where)
                if names_list is None:
                    self.error(env_where, f"{at} must be a list of client names")
                    continue
                chosen: list[str] = []
                for client_name, client_where in names_list:
                    if not isinstance(client_name, str):
                        self.error(
                            client_where,
                            f"{at}: {shown(client_name)} is not a name",
                        )
                    elif client_name not in clients:
                        self.error(
                            client_where,
                            f"{at}: unknown client {shown(client_name)}{suggest(client_name, clients)}",
                        )
                    elif client_name in chosen:
                        self.error(
                            client_where,
                            f"{at}: {shown(client_name)} is listed twice",
                        )
                    else:
                        chosen.append(client_name)
                result.append(Assignment(route_name, env_name, tuple(chosen), env_where))
        return tuple(result)


def _one_or_list(value: Any, where: Location) -> list[tuple[Any, Location]] | None:
    """A string or a YAML list of items, each with its location; None for anything else."""
    if isinstance(value, str):
        return [(value, where)]
    if isinstance(value, LocatedList):
        return list(zip(value, value.item_locations, strict=True))
    return None


def _unknown_environment(name: Any, environments: dict[str, Environment]) -> str:
    """Why ``name`` is not an environment, with a near miss, or how to declare more."""
    message = f"unknown environment {shown(name)}{suggest(name, environments)}"
    implicit = [e.name for e in environments.values() if e.implicit]
    if implicit:
        message += (
            f"; no environments are declared, so only the default environment {shown(implicit[0])} exists:"
            " list every environment under 'environments' to have more"
        )
    return message


def _normal_prefix(prefix: str) -> str:
    """A path prefix as request paths are matched: no query, decoded, no dot segments or //."""
    path = unquote(prefix.split("?", 1)[0].split("#", 1)[0]).replace("\\", "/")
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/")


def _quote_hint(value: Any) -> str:
    """YAML 1.1 reads some unquoted IPv6 addresses (1:2:3:4:5:6:7:8) as base-60 numbers."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return ' (YAML read an unquoted value as a number; put addresses in quotes, e.g. "1:2:3:4:5:6:7:8")'
    return ""


def _type_name(kind: type) -> str:
    return {
        str: "a string",
        bool: "true or false",
        int: "a number",
        float: "a number",
        LocatedDict: "a mapping",
        dict: "a mapping",
        LocatedList: "a list",
        list: "a list",
        type(None): "empty",
    }.get(kind, kind.__name__)
