"""Secrets: where their values come from, reading them at load, `{{secret:NAME}}` placeholders,
and the masked and real forms of what uses them (injected headers, the rate limit store URL).

Pure apart from reading the sources (environment variables, files) when a config loads; no
mitmproxy. A value never goes into a message, a repr or a log line: only the secret's name,
its source and a fingerprint (the first 8 hex digits of its SHA-256).

The loader calls `read_secret_entries`, `read_values`, `read_inject_headers`,
`read_signing_secrets`, `stray_placeholders` and `use_problems`, so that every problem names
file and line like any other; the policy calls `compile_injections` and `store_url`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from knoxcall_addon.model import (
    Config,
    ConfigError,
    Location,
    Problem,
    Route,
    Secret,
    SecretSource,
    SecretValues,
    cut,
    shown,
    suggest,
)
from knoxcall_addon.rateconfig import store_url_problem
from knoxcall_addon.yamlsource import LocatedDict, LocatedList

SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
PLACEHOLDER = re.compile(r"\{\{secret:([^{}]*)\}\}")
MARK = "{{secret:"
ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_KEYS = ("name", "env", "file", "environments", "description")
SOURCE_KEYS = ("env", "file")
MAX_SECRET_BYTES = 64 * 1024  # a secret file larger than this is refused, never read whole
# RFC 9110 token characters: a header name
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Names an injected header may not have: they frame the message or its route (the proxy's own
# x-knoxcall-* headers never go upstream either).
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters (a tab is fine)


# -- the secrets section ---------------------------------------------------------------------


def read_secret_entries(
    entries: list[tuple[Any, Location]], folder: str, environments: Iterable[str]
) -> tuple[dict[str, Secret], list[Problem]]:
    """The ``secrets:`` entries of every file as Secrets (by name), and their problems."""
    known_envs = set(environments)
    result: dict[str, Secret] = {}
    problems: list[Problem] = []
    for entry, where in entries:
        if not isinstance(entry, LocatedDict):
            problems.append(Problem(where, "each secret must be a mapping with a 'name'"))
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not SECRET_NAME.match(name):
            at = entry.where("name") if "name" in entry else entry.location
            problems.append(Problem(at, f"secret name {shown(name)} must match {SECRET_NAME.pattern}"))
            continue
        what = f"secret {shown(name)}"
        if name in result:
            first = result[name].location
            problems.append(Problem(entry.where("name"), f"{what} is defined twice (first at {first})"))
            continue
        problems += _unknown_keys(entry, SECRET_KEYS, what)
        description = entry.get("description", "")
        if not isinstance(description, str):
            problems.append(Problem(entry.where("description"), f"{what}: description must be a string"))
        source = _source(entry, what, folder, problems, required="environments" not in entry)
        per_env: dict[str, SecretSource] = {}
        raw = entry.get("environments")
        if raw is not None and not isinstance(raw, LocatedDict):
            problems.append(
                Problem(entry.where("environments"), f"{what}: environments must map environments to a source")
            )
        for env_name, value, env_where in raw.located_items() if isinstance(raw, LocatedDict) else ():
            if env_name not in known_envs:
                problems.append(Problem(env_where, f"{what}: unknown environment {shown(env_name)}"))
                continue
            if not isinstance(value, LocatedDict):
                message = (
                    f"{what}: the source for {shown(env_name)} must be a mapping like {{file: PATH}} or {{env: VAR}}"
                )
                problems.append(Problem(env_where, message))
                continue
            label = f"{what} ({cut(env_name)})"
            problems += _unknown_keys(value, SOURCE_KEYS, label)
            env_source = _source(value, label, folder, problems, required=True)
            if env_source is not None:
                per_env[env_name] = env_source
        result[name] = Secret(
            name, source, per_env, description if isinstance(description, str) else "", entry.location
        )
    return result, problems


def _unknown_keys(mapping: LocatedDict, allowed: tuple[str, ...], what: str) -> list[Problem]:
    return [
        Problem(mapping.where(key), f"unknown key {shown(key)} in {what}; allowed: {', '.join(allowed)}")
        for key in mapping
        if key not in allowed
    ]


def _source(
    mapping: LocatedDict, what: str, folder: str, problems: list[Problem], *, required: bool
) -> SecretSource | None:
    """Exactly one of ``env:`` and ``file:`` (a relative file is relative to the config folder)."""
    given = [key for key in SOURCE_KEYS if key in mapping]
    if len(given) > 1:
        problems.append(Problem(mapping.location, f"{what}: give exactly one source, env or file, not both"))
        return None
    if not given:
        if required:
            problems.append(Problem(mapping.location, f"{what} needs a source: env: VARIABLE or file: PATH"))
        return None
    kind: Literal["env", "file"] = given[0]  # type: ignore[assignment]
    ref = mapping[kind]
    where = mapping.where(kind)
    if not isinstance(ref, str) or not ref.strip():
        problems.append(Problem(where, f"{what}: {kind} must be a non-empty string"))
        return None
    if kind == "env":
        if not ENV_VAR.match(ref):
            problems.append(Problem(where, f"{what}: {shown(ref)} is not an environment variable name"))
            return None
        return SecretSource("env", ref, where)
    path = Path(os.path.expanduser(ref))
    if not path.is_absolute():
        path = Path(folder) / path
    return SecretSource("file", os.path.abspath(path), where)


def with_secrets(
    config: Config, entries: list[tuple[Any, Location]], problems: list[Problem], store_where: Location | None
) -> Config:
    """``config`` with its secrets (the ``secrets:`` entries) and their values, read now; their
    problems, and those of every use, added to ``problems``."""
    secrets, found = read_secret_entries(entries, config.folder, config.environments)
    problems += found
    config = dataclasses.replace(config, secrets=secrets, secret_values=read_values(secrets))
    if not problems:
        problems += use_problems(config, store_where)
    return config


def read_values(secrets: Mapping[str, Secret]) -> SecretValues:
    """Read every source of every secret once: its value, or why it has none."""
    read: dict[tuple[str, str], tuple[str | None, str]] = {}
    for secret in secrets.values():
        for source in (secret.source, *secret.environments.values()):
            if source is not None and (source.kind, source.ref) not in read:
                read[(source.kind, source.ref)] = read_source(source.kind, source.ref)
    files = sorted(ref for kind, ref in read if kind == "file")
    return SecretValues(read, _stamp((ref, read[("file", ref)]) for ref in files))


def read_source(kind: str, ref: str) -> tuple[str | None, str]:
    """(value, "") or (None, why): a variable unset or empty, a file missing, empty, too big,
    unreadable or not UTF-8. A file loses one trailing newline (as ``echo`` writes it)."""
    if kind == "env":
        value = os.environ.get(ref)
        if value is None:
            return None, "is not set"
        return (value, "") if value else (None, "is empty")
    try:
        with open(ref, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                return None, "is not a regular file"
            raw = f.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        return None, "does not exist"
    except IsADirectoryError:
        return None, "is a folder, not a file"
    except OSError as e:
        return None, f"cannot be read ({e.strerror or type(e).__name__})"
    if len(raw) > MAX_SECRET_BYTES:
        return None, f"is larger than {MAX_SECRET_BYTES // 1024} KiB"
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    return (value, "") if value else (None, "is empty")


def _stamp(items: Iterable[tuple[str, tuple[str | None, str]]]) -> str:
    digest = hashlib.sha256()
    for ref, (value, why) in items:
        digest.update(ref.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(b"v" + value.encode("utf-8", "surrogateescape") if value is not None else b"w" + why.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def files_stamp(files: Iterable[str]) -> str:
    """What ``SecretValues.file_stamp`` would be for these files now (hot reload: was one rotated?)."""
    return _stamp((ref, read_source("file", ref)) for ref in sorted(files))


# -- placeholders ----------------------------------------------------------------------------


def placeholder_names(text: str) -> tuple[list[str], str | None]:
    """The secret names a text refers to, and what is wrong with its placeholders (None if nothing)."""
    names = PLACEHOLDER.findall(text)
    for name in names:
        if not SECRET_NAME.match(name):
            return names, f"{{{{secret:{cut(name)}}}}} names no secret (a name matches {SECRET_NAME.pattern})"
    if MARK in PLACEHOLDER.sub("", text) or "{{ secret" in text or "{{secret }" in text:
        return names, "a placeholder is written {{secret:NAME}}, without spaces"
    return names, None


def fill(template: str, values: Mapping[str, str], encode: bool = False) -> str:
    """The template with each placeholder replaced by its value (percent-encoded with ``encode``)."""
    return PLACEHOLDER.sub(lambda m: quote(values[m.group(1)], safe="") if encode else values[m.group(1)], template)


def read_inject_headers(
    mapping: LocatedDict, what: str, *, allow_false: bool = False
) -> tuple[dict[str, str] | Literal[False] | None, list[Problem]]:
    """``mapping["inject_headers"]``: header name -> value (text and placeholders); False removes them."""
    if "inject_headers" not in mapping:
        return None, []
    value = mapping["inject_headers"]
    where = mapping.where("inject_headers")
    if value is False and allow_false:
        return False, []
    if not isinstance(value, LocatedDict) or not value:
        hint = ", or false to remove the route's here" if allow_false else ""
        return None, [Problem(where, f"{what}: inject_headers must be a mapping of header names to values{hint}")]
    problems: list[Problem] = []
    result: dict[str, str] = {}
    seen: set[str] = set()
    for name, text, at in value.located_items():
        if not isinstance(name, str) or not HEADER_NAME.match(name):
            problems.append(Problem(at, f"{what}: inject_headers: {shown(name)} is not a header name"))
            continue
        lowered = name.lower()
        if lowered in FORBIDDEN_HEADERS or lowered.startswith("x-knoxcall-") or lowered.startswith(":"):
            problems.append(
                Problem(at, f"{what}: inject_headers: {name} cannot be injected (it frames or routes the request)")
            )
            continue
        if lowered in seen:
            problems.append(Problem(at, f"{what}: inject_headers: {name} is given twice (names ignore case)"))
            continue
        seen.add(lowered)
        if not isinstance(text, str):
            problems.append(Problem(at, f"{what}: inject_headers: the value of {name} must be a string"))
            continue
        _, problem = placeholder_names(text)
        if problem is None and _UNSAFE_IN_HEADER.search(PLACEHOLDER.sub("", text)):
            problem = "a line break or control character cannot go into a header"
        if problem is not None:
            problems.append(Problem(at, f"{what}: inject_headers: {name}: {problem}"))
            continue
        result[name] = text
    return (result if not problems else None), problems


def read_signing_secrets(mapping: LocatedDict, what: str) -> tuple[tuple[str, ...], list[Problem]]:
    """A client's ``signing_secrets``: the names of its secrets, each written ``{{secret:NAME}}``."""
    if "signing_secrets" not in mapping:
        return (), []
    value = mapping["signing_secrets"]
    where = mapping.where("signing_secrets")
    if not isinstance(value, LocatedList) or not value:
        return (), [Problem(where, f'{what}: signing_secrets must be a list like ["{{{{secret:NAME}}}}"]')]
    names: list[str] = []
    problems: list[Problem] = []
    for i, item in enumerate(value):
        match = PLACEHOLDER.fullmatch(item) if isinstance(item, str) else None
        if match is None or not SECRET_NAME.match(match.group(1)):
            message = (
                f"{what}: each signing secret is a reference {{{{secret:NAME}}}} to a secret defined under "
                "'secrets' (a secret never goes into the YAML itself)"
            )
            problems.append(Problem(value.where(i), message))
        elif match.group(1) in names:
            problems.append(Problem(value.where(i), f"{what}: signing secret {match.group(1)} is listed twice"))
        else:
            names.append(match.group(1))
    return tuple(names), problems


# Where a placeholder may appear: (section, key of each entry), and settings.rate_limit_store
_ALLOWED = {("routes", "inject_headers"), ("clients", "signing_secrets")}


def stray_placeholders(data: Any) -> list[Problem]:
    """``{{secret:...}}`` anywhere but in inject_headers values, signing_secrets and
    settings.rate_limit_store: there it would be taken literally, so it is an error."""
    if not isinstance(data, LocatedDict):
        return []
    problems: list[Problem] = []
    for section, value, where in data.located_items():
        if section == "settings" and isinstance(value, LocatedDict):
            for key, item, at in value.located_items():
                if key != "rate_limit_store":
                    problems += _strays(item, at)
        elif section in ("routes", "clients") and isinstance(value, LocatedList):
            for i, entry in enumerate(value):
                if not isinstance(entry, LocatedDict):
                    problems += _strays(entry, value.where(i))
                    continue
                for key, item, at in entry.located_items():
                    if (section, key) in _ALLOWED:
                        continue
                    if section == "routes" and key == "environments" and isinstance(item, LocatedDict):
                        for _, override, env_at in item.located_items():
                            if isinstance(override, LocatedDict):
                                for okey, oitem, oat in override.located_items():
                                    if okey != "inject_headers":
                                        problems += _strays(oitem, oat)
                            else:
                                problems += _strays(override, env_at)
                        continue
                    problems += _strays(item, at)
        else:
            problems += _strays(value, where)
    return problems


def _strays(value: Any, where: Location) -> list[Problem]:
    found = next(_marked(value, where), None)
    if found is None:
        return []
    return [Problem(found, "{{secret:NAME}} may appear only in inject_headers values, signing_secrets and "
                           "settings.rate_limit_store; here it would be taken literally")]  # fmt: skip


def _marked(value: Any, where: Location) -> Iterator[Location]:
    if type(value) is str:
        if MARK in value:
            yield where
    elif isinstance(value, LocatedDict):
        for key, item, at in value.located_items():
            if isinstance(key, str) and MARK in key:
                yield at
            yield from _marked(item, at)
    elif isinstance(value, LocatedList):
        for i, item in enumerate(value):
            if type(item) is str:
                if MARK in item:
                    yield value.where(i)
            elif isinstance(item, LocatedDict | LocatedList):
                yield from _marked(item, value.where(i))


# -- uses: each must name a secret with a value where it is in force -------------------------


def use_problems(config: Config, store_where: Location | None = None) -> list[Problem]:
    """Unknown secret names anywhere; and, where a secret is in force (an enabled route's
    environment, a client assigned to an enabled route that requires signatures, the rate
    limit store), a value for that environment, fit for its use. Never a value in a message."""
    secrets, values = config.secrets, config.secret_values
    problems: dict[tuple[Location, str], None] = {}  # ordered, without repeats

    def add(where: Location, message: str) -> None:
        problems[(where, message)] = None

    def need(name: str, environment: str, use: str, *, header: bool = False) -> None:
        secret = secrets[name]
        source = secret.source_for(environment)
        if source is None:
            add(secret.location, f"secret {name} has no source for environment {environment} (used by {use})")
            return
        value = values.value(source)
        if value is None:
            add(source.location, f"secret {name} has no value in {environment}: {source.describe()} "
                                 f"{values.why_missing(source)} (used by {use})")  # fmt: skip
        elif header and _UNSAFE_IN_HEADER.search(value):
            add(source.location, f"secret {name} ({environment}, {source.describe()}) holds a line break or "
                                 f"control character: it cannot go into a header (used by {use})")  # fmt: skip

    for route in config.routes.values():
        for environment in config.environments:
            injected = route.inject_headers_for(environment) or {}
            for header, template in injected.items():
                for name in PLACEHOLDER.findall(template):
                    if name not in secrets:
                        add(route.location, f"route {route.name}: inject_headers {header} names unknown secret "
                                            f"{shown(name)}{suggest(name, secrets)}")  # fmt: skip
                    elif route.enabled:
                        need(name, environment, f"route {route.name} inject_headers {header}", header=True)
    signed_envs = _signed_environments(config)
    for client in config.clients.values():
        for name in client.signing_secrets:
            if name not in secrets:
                add(client.location, f"client {client.name}: signing_secrets names unknown secret "
                                     f"{shown(name)}{suggest(name, secrets)}")  # fmt: skip
                continue
            if client.enabled:
                for environment in signed_envs.get(client.name, ()):
                    need(name, environment, f"client {client.name} signing_secrets")
    template = config.settings.rate_limit_store
    if MARK in template:
        where = store_where or Location(config.folder, 0)
        for name in PLACEHOLDER.findall(template):
            if name not in secrets:
                add(where, f"settings.rate_limit_store names unknown secret {shown(name)}{suggest(name, secrets)}")
            else:
                need(name, config.settings.default_environment, "settings.rate_limit_store")
        if not problems and store_url_problem(store_url(config)):  # (never the URL with its secrets in it)
            add(where, "settings.rate_limit_store with its secrets filled in is not a valid store URL: "
                       "it must be redis://HOST:PORT/DB (rediss:// for TLS)")  # fmt: skip
    return [Problem(where, message) for where, message in problems]


def _signed_environments(config: Config) -> dict[str, list[str]]:
    """client -> the environments where it is assigned to an enabled route that requires signatures."""
    result: dict[str, list[str]] = {}
    for assignment in config.assignments:
        route = config.routes.get(assignment.route)
        if route is None or not route.enabled or not route.requires_signature:
            continue
        for client in assignment.clients:
            envs = result.setdefault(client, [])
            if assignment.environment not in envs:
                envs.append(assignment.environment)
    return result


def value_for(config: Config, name: str, environment: str) -> str | None:
    """The value of secret ``name`` in ``environment`` (None when it has none)."""
    secret = config.secrets.get(name)
    source = secret.source_for(environment) if secret is not None else None
    return config.secret_values.value(source) if source is not None else None


# -- what the proxy compiles at load ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Injection:
    """The headers one route injects in one environment, compiled for the request path.

    ``fields`` are what the flow shows (the values as written, placeholders in place of
    secrets); ``wire`` pairs, per field holding a placeholder, its lower-case name and shown
    value with the real value that only the upstream receives (never in the repr: a log line,
    an assertion's message or a traceback that shows an Injection shows no secret).
    """

    names: frozenset[bytes]  # lower-case names: the caller's fields of these names are replaced
    fields: tuple[tuple[bytes, bytes], ...]
    wire: tuple[tuple[bytes, bytes, bytes], ...] = field(repr=False)


def compile_injections(config: Config) -> dict[tuple[str, str], Injection]:
    """(route, environment) -> Injection, for enabled routes (use_problems has checked every value)."""
    result: dict[tuple[str, str], Injection] = {}
    for route in config.routes.values():
        if not route.enabled:
            continue
        for environment in config.environments:
            injected = route.inject_headers_for(environment)
            if injected:
                result[(route.name, environment)] = _injection(config, route, environment, injected)
    return result


def _injection(config: Config, route: Route, environment: str, injected: Mapping[str, str]) -> Injection:
    fields: list[tuple[bytes, bytes]] = []
    wire: list[tuple[bytes, bytes, bytes]] = []
    for name, template in injected.items():
        shown_value = template.encode("utf-8", "surrogateescape")
        fields.append((name.encode(), shown_value))
        if MARK in template:
            values = _values(config, template, environment)
            wire.append((name.lower().encode(), shown_value, fill(template, values).encode("utf-8", "surrogateescape")))
    return Injection(frozenset(n.lower() for n, _ in fields), tuple(fields), tuple(wire))


def _values(config: Config, template: str, environment: str) -> dict[str, str]:
    """The value in ``environment`` of each secret ``template`` names. One without a value (a
    config `use_problems` did not check) is a ConfigError: never an empty value filled in."""
    values: dict[str, str] = {}
    for name in PLACEHOLDER.findall(template):
        value = value_for(config, name, environment)
        if value is None:
            raise ConfigError([Problem(Location(config.folder, 0), f"secret {name} has no value in {environment}")])
        values[name] = value
    return values


def store_url(config: Config) -> str:
    """settings.rate_limit_store with its secrets filled in (those of the default environment).

    A placeholder that is the whole setting is the URL itself; one inside a URL is
    percent-encoded (a password may hold '@', '/' or ':'), as redis-py decodes it."""
    template = config.settings.rate_limit_store
    if MARK not in template:
        return template
    values = _values(config, template, config.settings.default_environment)
    whole = PLACEHOLDER.fullmatch(template) is not None
    return fill(template, values, encode=not whole)


def store_secrets(config: Config) -> tuple[str, ...]:
    """The values filled into the store URL, raw and encoded: scrubbed from any error text."""
    environment = config.settings.default_environment
    found: list[str] = []
    for name in PLACEHOLDER.findall(config.settings.rate_limit_store):
        value = value_for(config, name, environment)
        if value:
            found += [value, quote(value, safe="")]
    return tuple(found)


# -- what operators see ----------------------------------------------------------------------


def secret_lines(config: Config) -> list[str]:
    """One line per secret and environment: its source and fingerprint, or why it has none."""
    lines: list[str] = []
    values = config.secret_values
    for secret in config.secrets.values():
        parts = []
        for environment in config.environments:
            source = secret.source_for(environment)
            if source is None:
                parts.append(f"{environment}: no source")
                continue
            fingerprint = values.fingerprint(source)
            if fingerprint:
                parts.append(f"{environment}: {source.describe()} sha256:{fingerprint}")
            else:
                parts.append(f"{environment}: no value ({source.describe()} {values.why_missing(source)})")
        lines.append(f"secret {secret.name}: " + "; ".join(parts))
    return lines
