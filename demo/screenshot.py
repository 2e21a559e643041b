"""The body of scripts/screenshot: mitmweb with KnoxCall as an operator sees it, in a real browser.

Starts an echo upstream and mitmweb (the demo config, the comment column on), sends the
demo's allowed and refused calls, then has headless Chromium (Debian's `chromium`) take a
screenshot of the flow list. Everything stays on loopback; everything started is stopped.

    scripts/screenshot [OUT.png]     (default: mitmweb.png)
"""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.run import CALLERS, CONFIG  # noqa: E402
from tests.harness import MitmDump, Upstream, client_from, free_port  # noqa: E402

WEB_COLUMNS = ["tls", "icon", "path", "method", "status", "comment", "time"]


def find_chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)


def screenshot(browser: str, url: str, out: Path, profile: Path) -> None:
    """Headless Chromium, closed network habits (no background requests), one PNG."""
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1400,700", "--virtual-time-budget=5000",
         f"--screenshot={out}", url],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(argv[0] if argv else "mitmweb.png").resolve()
    browser = find_chromium()
    if browser is None:
        print("scripts/screenshot needs Chromium: apt-get install chromium", file=sys.stderr)
        return 2
    token = secrets.token_hex(16)
    web_port = free_port()
    with tempfile.TemporaryDirectory(prefix="knoxcall-shot-") as tmp, Upstream("echo") as upstream:
        proxy = MitmDump(
            CONFIG,
            mode=f"reverse:{upstream.url}",
            tool="mitmweb",
            log_path=Path(tmp) / "mitmweb.log",
            extra=["--set", f"web_port={web_port}", "--set", "web_open_browser=false",
                   "--set", f"web_password={token}", "--set", f"confdir={Path(tmp) / 'conf'}",
                   *(arg for column in WEB_COLUMNS for arg in ("--set", f"web_columns={column}"))],
        )  # fmt: skip
        with proxy:
            for source, method, path, _ in CALLERS:
                with client_from(source) as client:
                    client.request(method, proxy.url + path)
            time.sleep(0.5)
            screenshot(browser, f"http://127.0.0.1:{web_port}/?token={token}", out, Path(tmp) / "profile")
    print(f"mitmweb's flow list with KnoxCall's comments: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
