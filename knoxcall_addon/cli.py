"""The `knoxcall` command: check, explain, ping, new-key, sign, logs.

Exit codes: 0 fine, 1 config errors (or warnings with --strict, or a denied explain
with --exit-code), 2 usage errors, 3 ICMP not permitted (ping).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from knoxcall_addon import loginsights
from knoxcall_addon.connectivity import (
    ICMP_CAVEAT,
    Pinger,
    PingNotPermitted,
    PingSettings,
    format_table,
    icmp_pinger,
    ping_targets,
    targets,
)
from knoxcall_addon.explain import explain, request_for
from knoxcall_addon.ipmatch import parse_ip
from knoxcall_addon.lint import RULES, Finding, lint, report_mode_places
from knoxcall_addon.loader import OBJECT_NAME
from knoxcall_addon.model import Config, ConfigError
from knoxcall_addon.policy import Policy, load_policy
from knoxcall_addon.secretsource import secret_lines
from knoxcall_addon.signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_NO_ICMP = 3

DEFAULT_CONFIG = "config"  # the addon's knoxcall_config default, relative to the working directory


def main(argv: Sequence[str] | None = None, *, pinger: Pinger = icmp_pinger, out: TextIO | None = None) -> int:
    """Run one subcommand; return its exit code (the console script exits with it)."""
    out = out or sys.stdout
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    if args.command in ("check", "explain", "ping"):
        folder = _config_folder(args)
        if folder is None:
            return EXIT_USAGE
        args.config = folder
    if args.command == "check":
        unknown = sorted(set(args.ignore or ()) - set(RULES))
        if unknown:
            sys.stderr.write(f"knoxcall check: unknown rule(s) {', '.join(unknown)}; rules: {', '.join(RULES)}\n")
            return EXIT_USAGE
        return check(args.config, fmt=args.format, strict=args.strict, ignore=set(args.ignore or ()), out=out)
    if args.command == "explain":
        return explain_command(args, out)
    if args.command == "ping":
        settings = PingSettings(count=args.count, interval=args.interval, timeout=args.timeout)
        return ping(args.config, settings, include_all=args.all, pinger=pinger, out=out)
    if args.command == "new-key":
        return new_key(args.type, args.name, out)
    if args.command == "sign":
        return sign_command(args, out)
    if args.command == "logs":
        return loginsights.logs_command(args, out)
    if args.command == "echo":
        from knoxcall_addon.echoserver import serve

        serve(args.host, args.port)
        return EXIT_OK
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knoxcall", description="KnoxCall operator tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("check", help="validate the config exactly as the proxy loads it, then lint it")
    _config_arguments(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too (for CI of a config repository)")
    p.add_argument("--ignore", action="append", metavar="RULE", help="skip a lint rule (repeatable)")

    p = sub.add_parser("explain", help="the decision the proxy would make for an IP, route and environment")
    p.add_argument("--ip", required=True, help="the caller's address (the TCP peer)")
    p.add_argument("--route", required=True)
    p.add_argument("--env", help="environment (default: the default environment)")
    p.add_argument("--key-name", help="name of an API key in the config (the secret is never needed)")
    _config_arguments(p)
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="a request header, e.g. 'X-Forwarded-For: 10.0.0.1' (repeatable)",
    )
    p.add_argument("--method", help="HTTP method (default GET, or the route's first allowed method)")
    p.add_argument("--host", help="host for the route's match (default: one the match accepts)")
    p.add_argument("--path", help="path for the route's match (default: its path_prefix)")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when the request would be denied")

    p = sub.add_parser("ping", help="ICMP check of server clients' single addresses")
    _config_arguments(p)
    p.add_argument("--count", type=_positive_int, default=3, help="echo requests per address (default 3)")
    p.add_argument("--timeout", type=_positive_float, default=1.0, help="seconds to wait per reply (default 1)")
    p.add_argument("--interval", type=_positive_float, default=0.2, help="seconds between requests (default 0.2)")
    p.add_argument("--all", action="store_true", help="also user and disabled clients (ranges are still skipped)")

    p = sub.add_parser("new-key", help="print a new random API key once, and its api_keys entry")
    p.add_argument("--type", choices=("live", "test"), default="live")
    p.add_argument("--name", default="new-key", help="name for the api_keys entry (default: new-key)")

    p = sub.add_parser("sign", help="the headers (and a curl command) a caller sends for a signed request")
    p.add_argument("--secret-env", required=True, metavar="VAR", help="environment variable holding the secret")
    p.add_argument("--method", default="GET", help="HTTP method, as sent (default GET)")
    p.add_argument("--path", required=True, help="path as sent, with its query, e.g. '/v1/pay?x=1'")
    p.add_argument("--body-file", metavar="FILE", help="the exact body bytes (default: no body)")
    p.add_argument("--nonce", nargs="?", const="", metavar="NONCE", help="sign with a nonce (random unless given)")
    p.add_argument("--timestamp", type=_positive_int, help="Unix seconds (default: now)")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the proxy's base URL, for the curl command")
    p = sub.add_parser("logs", help="summary of the access log: denials, top refused callers and the fix for each")
    loginsights.add_arguments(p)

    p = sub.add_parser("echo", help="a stand-in API for trying KnoxCall: answers with what each request carried")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_positive_int, default=9000, help="port (default 9000, the example config's target)")
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config folder, taken the same way by every command that reads one: as the
    positional CONFIG_DIR or as --config (explain had only the option, check and ping
    only the positional, so a newcomer's first guess failed for one of them)."""
    parser.add_argument(
        "config", nargs="?", default=None, metavar="CONFIG_DIR", help=f"config folder (default: {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--config", dest="config_option", default=None, metavar="CONFIG_DIR", help="the same, as an option"
    )


def _config_folder(args: argparse.Namespace) -> str | None:
    """The folder named by CONFIG_DIR or --config (the default when neither); None, with
    a message, when both name different folders."""
    positional, option = args.config, args.config_option
    if positional is not None and option is not None and positional != option:
        sys.stderr.write(
            f"knoxcall {args.command}: two config folders given ({positional!r} and --config {option!r}); name one\n"
        )
        return None
    return next((f for f in (positional, option) if f is not None), DEFAULT_CONFIG)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _load(folder: str) -> tuple[Policy | None, list[Finding]]:
    """The policy as the addon loads it, or the loader's problems as `config` findings."""
    try:
        return load_policy(folder), []
    except ConfigError as e:
        return None, [Finding(p.location, "error", "config", p.message) for p in e.problems]


# -- check -------------------------------------------------------------------------------


def check(folder: str, *, fmt: str = "text", strict: bool = False, ignore: set[str] = frozenset(), out: TextIO) -> int:
    policy, findings = _load(folder)
    notes: list[str] = []
    if policy is not None:
        findings = lint(policy.config)
        notes = config_notes(policy.config)
    findings = [f for f in findings if f.rule not in ignore]
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    if fmt == "json":
        json.dump(
            {
                "config": folder,
                "loaded": policy is not None,
                "errors": errors,
                "warnings": warnings,
                "findings": [f.as_dict() for f in findings],
                "notes": notes,
            },
            out,
            indent=2,
        )
        out.write("\n")
    else:
        for finding in findings:
            out.write(f"{finding}\n")
        for note in notes:
            out.write(f"note: {note}\n")
        state = "invalid" if policy is None else "loads"
        named = folder if folder.strip() else '""'  # as check_folder names an empty one
        out.write(f"{named}: config {state}; {errors} error(s), {warnings} warning(s)\n")
    if errors or (strict and warnings):
        return EXIT_FINDINGS
    return EXIT_OK


def config_notes(config: Config) -> list[str]:
    """What the loader assumed for a config that does not say it (neither an error nor a
    lint finding: the config is fine, but its reader should know)."""
    notes = [
        f"no environments are declared, so the default environment {env.name!r} is the only one; "
        "an 'environments' list replaces it"
        for env in config.environments.values()
        if env.implicit
    ] + secret_lines(config)  # which value each secret has (a fingerprint, never the value)
    default = config.settings.default_environment
    notes += [
        f"route {route!r} is in report mode in {environment}: refusals of the client check are logged, not enforced"
        for route, environment in report_mode_places(config)
        if environment != default
    ]
    return notes


# -- explain -----------------------------------------------------------------------------


def explain_command(args: argparse.Namespace, out: TextIO) -> int:
    headers: list[tuple[str, str]] = []
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            sys.stderr.write(f"knoxcall explain: --header {header!r} must look like NAME:VALUE\n")
            return EXIT_USAGE
        headers.append((name.strip(), value.strip()))
    if parse_ip(args.ip) is None:
        sys.stderr.write(f"knoxcall explain: --ip {args.ip!r} is not an IP address\n")
        return EXIT_USAGE
    policy, problems = _load(args.config)
    if policy is None:
        for finding in problems:
            out.write(f"{finding}\n")
        return EXIT_FINDINGS
    facts = request_for(
        policy, args.ip, args.route, args.env, args.key_name, headers, method=args.method, host=args.host,
        path=args.path,
    )  # fmt: skip
    result = explain(policy, facts)
    out.write(result.text() + "\n")
    if args.exit_code and not result.decision.allowed:
        return EXIT_FINDINGS
    return EXIT_OK


# -- ping --------------------------------------------------------------------------------


def ping(
    folder: str, settings: PingSettings, *, include_all: bool = False, pinger: Pinger = icmp_pinger, out: TextIO
) -> int:
    policy, problems = _load(folder)
    if policy is None:
        for finding in problems:
            out.write(f"{finding}\n")
        return EXIT_FINDINGS
    items = targets(policy.config, include_all=include_all)
    if not items:
        what = "client" if include_all else "enabled server client"
        out.write(f"no {what} has a single-address network (/32 or /128) to ping; ranges are never pinged\n")
        return EXIT_OK
    try:
        rows = asyncio.run(ping_targets(items, settings, pinger))
    except PingNotPermitted as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_NO_ICMP
    out.write(format_table(rows) + "\n")
    out.write(f"note: {ICMP_CAVEAT}\n")
    return EXIT_OK


# -- new-key -----------------------------------------------------------------------------


def new_key(key_type: str, name: str, out: TextIO) -> int:
    if not OBJECT_NAME.match(name):
        sys.stderr.write(f"knoxcall new-key: --name {name!r} must match {OBJECT_NAME.pattern}\n")
        return EXIT_USAGE
    key = f"kc_{key_type}_{secrets.token_urlsafe(32)}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    out.write(
        f"New {key_type} API key (shown only now; store it in your secret manager, send it as x-knoxcall-key):\n"
        f"\n    {key}\n\n"
        "Paste this entry under api_keys: in your config (it holds only the key's SHA-256):\n\n"
        f"  - name: {name}\n"
        f'    key_sha256: "{digest}"\n'
        f"    type: {key_type}\n"
        "    enabled: true\n"
    )
    return EXIT_OK


# -- sign --------------------------------------------------------------------------------


def sign_command(args: argparse.Namespace, out: TextIO) -> int:
    """Print what a caller sends on a signed route, computed as the proxy checks it (signing.py).

    The secret comes from an environment variable, never the command line (shell history,
    ps); the output holds the signature, which does not reveal it."""
    secret = os.environ.get(args.secret_env, "")
    if not secret:
        sys.stderr.write(f"knoxcall sign: environment variable {args.secret_env} is not set or empty\n")
        return EXIT_USAGE
    body = b""
    if args.body_file:
        try:
            body = Path(args.body_file).read_bytes()
        except OSError as e:
            sys.stderr.write(f"knoxcall sign: cannot read --body-file {args.body_file}: {e.strerror}\n")
            return EXIT_USAGE
    timestamp = str(args.timestamp or int(time.time()))
    nonce = None if args.nonce is None else (args.nonce or secrets.token_urlsafe(16))
    headers = [(TIMESTAMP_HEADER, timestamp)] + ([(NONCE_HEADER, nonce)] if nonce is not None else [])
    headers.append((SIGNATURE_HEADER, sign(secret, timestamp, args.method, args.path, body, nonce)))
    for name, value in headers:
        out.write(f"{name}: {value}\n")
    curl = ["curl", "-X", args.method, args.url.rstrip("/") + args.path]
    for name, value in headers:
        curl += ["-H", f"{name}: {value}"]
    if args.body_file:
        curl += ["--data-binary", f"@{args.body_file}"]
    out.write("\n" + " ".join(shlex.quote(word) for word in curl) + "\n")
    return EXIT_OK


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
