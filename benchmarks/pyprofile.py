"""Instructions per Python function, from callgrind: which step of the request path costs what.

callgrind sees only the interpreter's C functions. Run with ``python -X perf``, CPython
3.12 calls every Python function through a small trampoline of its own and writes their
addresses to ``/tmp/perf-PID.map``; callgrind counts each trampoline as a function, so
with the map its figures become per-Python-function figures (inclusive: with everything
the function called). -X perf also routes calls between Python functions through the
trampolines, which costs a little per call: use the figures to compare steps, and the
plain counts (instructions.py) for the totals.

    python -m benchmarks.pyprofile --requests 200 --config FOLDER [--match knoxcall_addon]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import instructions

_LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$")
_ADDRESS = re.compile(r"\?\?\?:0x([0-9a-f]+)('\d+)?\s")


def perf_map(path: Path) -> dict[int, str]:
    """Trampoline address -> "function:file", from CPython's perf map."""
    names = {}
    for line in path.read_text().splitlines():
        address, _, rest = line.partition(" ")
        name = rest.partition(" ")[2]
        names[int(address, 16)] = name.removeprefix("py::")
    return names


def annotate(dump: Path, inclusive: bool) -> list[tuple[int, str]]:
    """(instructions, callgrind's function name) for every function in a dump."""
    out = subprocess.run(["callgrind_annotate", "--threshold=100", f"--inclusive={'yes' if inclusive else 'no'}",
                          str(dump)], capture_output=True, text=True, check=True).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        match = _LINE.match(line)
        if match and ":" in match.group(2):
            rows.append((int(match.group(1).replace(",", "")), match.group(2)))
    return rows


def python_costs(dump: Path, names: dict[int, str]) -> dict[str, int]:
    """Python function -> inclusive instructions (all it ran, with what it called)."""
    costs: dict[str, int] = {}
    for count, function in annotate(dump, inclusive=True):
        match = _ADDRESS.match(function + " ")
        if not match or match.group(2):  # f'2: a recursive call, inside f's figure already
            continue
        name = names.get(int(match.group(1), 16))
        if name is not None:
            costs[name] = max(costs.get(name, 0), count)
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pyprofile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="KnoxCall config folder (default: bare mitmdump)")
    parser.add_argument("--script", help="the script to load (default: KnoxCall's with --config, none without)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--header", action="append", default=["x-knoxcall-route: bench-route"])
    parser.add_argument("--match", default="", help="only functions whose name or file contains this")
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], help="an extra mitmdump option, NAME=VALUE")
    args = parser.parse_args(argv)
    headers = dict((k.strip(), v.strip()) for k, v in (h.split(":", 1) for h in args.header))
    script = args.script or (str(instructions.ROOT / "knoxcall_addon" / "addon.py") if args.config else None)
    mitm_args = ["-s", script] if script else []
    if args.config:
        mitm_args += ["--set", f"knoxcall_config={args.config}"]
    for option in args.set:
        mitm_args += ["--set", option]
    variant = instructions.Variant("profiled", mitm_args, headers, python_args=["-X", "perf"])
    work = Path(tempfile.mkdtemp(prefix="knoxcall-pyprofile-"))
    try:
        result = instructions.count_variants([variant], work, requests=min(args.requests, 5000), rounds=1,
                                             warmup=100, keep_dumps=True)  # fmt: skip
        folder = next(work.glob("callgrind-*"))
        dump = next(folder.glob("round-1.*"))
        pid = int(re.search(r"==(\d+)==", (folder / "mitmdump.log").read_text()).group(1))
        map_path = Path(f"/tmp/perf-{pid}.map")
        costs = python_costs(dump, perf_map(map_path))
        map_path.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = min(args.requests, 5000)
    total = result["variants"]["profiled"]["instructions_per_request"]
    print(f"instructions per request (with -X perf's trampolines): {total:,}")
    print(f"{'inclusive':>12}  per request; function:file")
    rows = sorted(costs.items(), key=lambda item: -item[1])
    shown = 0
    for name, inclusive in rows:
        if args.match and args.match not in name:
            continue
        print(f"{inclusive / n:>12,.0f}  {name}")
        shown += 1
        if shown >= args.top:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
