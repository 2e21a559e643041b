"""The body of scripts/demo: a local upstream and mitmdump with demo/config, callers from
allowed and refused loopback addresses, each response next to its event-log line.

Everything stays on loopback (127.0.0.0/8); everything started here is stopped on exit.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from knoxcall_addon.explain import explain_text  # noqa: E402
from knoxcall_addon.policy import load_policy  # noqa: E402
from tests.harness import MitmDump, Upstream, client_from  # noqa: E402

CONFIG = ROOT / "demo" / "config"
CALLERS = [
    ("127.0.0.9", "GET", "/api/hello", "in demo-office: allowed"),
    ("127.0.0.99", "GET", "/api/hello", "in no client: refused"),
    ("127.0.0.17", "GET", "/api/hello", "staging-runner, not assigned in production: refused"),
    ("127.0.0.33", "GET", "/api/hello", "old-vpn, disabled: refused"),
    ("127.0.0.9", "GET", "/elsewhere", "allowed address, but no route matches: refused"),
]


def _log_line(proxy: MitmDump, request_id: str) -> str:
    """The event-log line of one request (mitmdump prints it as it decides)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in proxy.log_text().splitlines():
            if f"id={request_id}" in line and "knoxcall:" in line:
                return line[line.index("knoxcall:") :]
        time.sleep(0.05)
    return "(no log line found)"


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks on kill
    print(f"KnoxCall demo: config {CONFIG.relative_to(ROOT)}/, everything on loopback\n")
    with tempfile.TemporaryDirectory(prefix="knoxcall-demo-") as tmp, Upstream("echo") as upstream:
        proxy = MitmDump(CONFIG, mode=f"reverse:{upstream.url}", log_path=Path(tmp) / "mitmdump.log")
        with proxy:
            print(f"upstream (echo server): {upstream.url}")
            print(f"proxy (mitmdump):       {proxy.url}  (--mode reverse:{upstream.url})\n")
            for source, method, path, why in CALLERS:
                with client_from(source) as client:
                    response = client.request(method, proxy.url + path)
                request_id = response.headers.get("x-knoxcall-request-id", "")
                try:
                    body = response.json()
                    if response.status_code == 200:
                        body = {k: body[k] for k in ("upstream", "method", "path", "peer")}
                    shown = json.dumps(body)
                except ValueError:
                    shown = response.text[:200]
                print(f"{source:>11} {method} {path}   ({why})")
                print(f"{'response':>11} {response.status_code} {shown}")
                print(f"{'log':>11} {_log_line(proxy, request_id)}\n")
        print("why was 127.0.0.17 refused?  knoxcall explain --config demo/config --ip 127.0.0.17 --route demo-api")
        print("    " + explain_text(load_policy(CONFIG), "127.0.0.17", "demo-api").replace("\n", "\n    "))
    print("\ndemo done: mitmdump and the upstream are stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
