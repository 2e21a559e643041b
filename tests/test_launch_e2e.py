"""Fail closed at launch and on script reloads, against a real mitmdump and a real upstream.

mitmproxy applies ``--set knoxcall_*`` values only when the script's addons register;
a value that does not parse (or an option given twice) made it drop the whole script
without a word, and every caller reached the upstream. Here each such launch must exit
non-zero with a message naming the option, and no request may reach the upstream while
the process is up. A ``-s`` script that mitmproxy reloads (its file changed) and that
fails to load must leave the proxy refusing everything, not forwarding unchecked.

Sources: office 127.0.0.8/29 (127.0.0.9 calls), stranger 127.0.0.99. Loopback only.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import ADDON, BIN, ROOT, MitmDump, Upstream, client_from, free_port

OFFICE = "127.0.0.9"
STRANGER = "127.0.0.99"
ROUTE = {"x-knoxcall-route": "api"}
INACTIVE = {"error": "Access control inactive", "status": 503}


@pytest.fixture
def folder(tmp_path: Path, upstream: Upstream) -> Path:
    """A config that allows the office, and no one else, to reach the upstream."""
    target = tmp_path / "config"
    target.mkdir()
    config = {
        "environments": [{"name": "production"}],
        "clients": [{"name": "office", "ip_address": "127.0.0.8/29"}],
        "routes": [{"name": "api", "target_base_url": upstream.url}],
        "assignments": {"api": {"production": ["office"]}},
    }
    (target / "knoxcall.yaml").write_text(yaml.safe_dump(config))
    return target


def proxy_args(config: Path, port: int, upstream: Upstream, *extra: str, script: Path = ADDON) -> list[str]:
    return [
        str(BIN / "mitmdump"), "-s", str(script), "--set", f"knoxcall_config={config}",
        "--listen-host", "127.0.0.1", "-p", str(port), "--mode", f"reverse:{upstream.url}",
        "--set", "connection_strategy=lazy", "--set", "keep_host_header=true", *extra,
    ]  # fmt: skip


class Proxy(MitmDump):
    """`MitmDump` (startup wait, log, stop) around any command line."""

    def __init__(self, args: Sequence[str], port: int, log_path: Path) -> None:
        super().__init__(log_path.parent, port=port, log_path=log_path)
        self.args = list(args)


def get(source: str, url: str, client: httpx.Client | None = None) -> httpx.Response:
    if client is not None:
        return client.get(url + "/v1/x", headers=ROUTE)
    with client_from(source, timeout=5) as fresh:
        return fresh.get(url + "/v1/x", headers=ROUTE)


def launch_expecting_exit(
    args: Sequence[str], port: int, log_path: Path, within: float = 20
) -> tuple[int | None, str, list[int]]:
    """Start mitmdump and send a stranger's requests while it is up; (exit code, output, statuses seen).

    The exit code is None when it was still running after ``within`` seconds (then stopped).
    """
    statuses: list[int] = []
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + within
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    statuses.append(get(STRANGER, f"http://127.0.0.1:{port}").status_code)
                except httpx.HTTPError:
                    time.sleep(0.01)  # not listening yet, or going down
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
                code = None
            else:
                code = process.returncode
    return code, log_path.read_text("utf-8", "replace"), statuses


BAD_LAUNCHES = {
    "bad boolean": (["--set", "knoxcall_reload=no"], ["knoxcall_reload=no", 'boolean must be "true", "false"']),
    "bad integer": (["--set", "knoxcall_ping_interval=1m"], ["knoxcall_ping_interval=1m", "not an integer"]),
    "config given twice (scripts/run with the user's own)": (
        ["--set", f"knoxcall_config={ROOT / 'config'}"],
        ["knoxcall_config is given 2 times", f"--set knoxcall_config={ROOT / 'config'}"],
    ),
    "same value given twice": (
        ["--set", "knoxcall_reload=true", "--set", "knoxcall_reload=true"],
        ["knoxcall_reload is given 2 times"],
    ),
    "misspelled": (
        ["--set", "knoxcall_confg=elsewhere"],
        ["unknown option knoxcall_confg", "did you mean knoxcall_config?"],
    ),
    "no value": (["--set", "knoxcall_access_log"], ["--set knoxcall_access_log", "Option is required"]),
}


@pytest.mark.parametrize("case", list(BAD_LAUNCHES))
def test_bad_knoxcall_option_at_launch_exits_non_zero_and_forwards_nothing(case, folder, upstream, tmp_path) -> None:
    extra, expected = BAD_LAUNCHES[case]
    port = free_port()
    code, output, statuses = launch_expecting_exit(
        proxy_args(folder, port, upstream, *extra), port, tmp_path / "out.log"
    )
    assert upstream.seen == [], f"forwarded while up ({statuses}):\n{output}"
    assert code not in (None, 0), f"exit code {code}:\n{output}"
    for words in expected:
        assert words in output, output
    assert 200 not in statuses


def test_another_scripts_bad_option_that_drops_knoxcall_exits_non_zero(folder, upstream, tmp_path) -> None:
    """An option of a script loaded before KnoxCall that does not parse breaks KnoxCall's
    registration too (mitmproxy applies all pending --set values at each registration)."""
    other = tmp_path / "other_script.py"
    other.write_text(
        "class Other:\n"
        "    def load(self, loader):\n"
        "        loader.add_option('other_limit', int, 0, 'A limit of some other addon.')\n"
        "addons = [Other()]\n"
    )
    port = free_port()
    args = proxy_args(folder, port, upstream, "--set", "other_limit=lots")
    args[1:1] = ["-s", str(other)]  # before KnoxCall's script
    code, output, statuses = launch_expecting_exit(args, port, tmp_path / "out.log")
    assert upstream.seen == [], f"forwarded while up ({statuses}):\n{output}"
    assert code not in (None, 0), f"exit code {code}:\n{output}"
    assert "knoxcall: KnoxCall's hooks are not active at startup" in output, output


def test_a_script_before_knoxcalls_makes_the_proxy_refuse_to_start(folder, upstream, tmp_path) -> None:
    """mitmproxy skips the later scripts' hooks when an earlier script's hook raises: a
    request would go on undecided. KnoxCall's script must come first."""
    other = tmp_path / "raising_script.py"
    other.write_text(
        "class Raising:\n"
        "    def requestheaders(self, flow):\n"
        "        raise RuntimeError('an unrelated bug')\n"
        "addons = [Raising()]\n"
    )
    port = free_port()
    args = proxy_args(folder, port, upstream)
    args[1:1] = ["-s", str(other)]  # before KnoxCall's script
    code, output, statuses = launch_expecting_exit(args, port, tmp_path / "out.log")
    assert upstream.seen == [], f"forwarded while up ({statuses}):\n{output}"
    assert code not in (None, 0), f"exit code {code}:\n{output}"
    assert "run before KnoxCall's" in output and "give -s knoxcall_addon/addon.py first" in output, output
    # after KnoxCall's, the same script is fine: its exception no longer skips the decision
    args = proxy_args(folder, port, upstream, "-s", str(other))
    with Proxy(args, port, tmp_path / "after.log") as proxy:
        assert get(STRANGER, proxy.url).status_code == 403
        assert get(OFFICE, proxy.url).status_code == 200
    assert len(upstream.seen) == 1


# -- scripts/run -------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["--set knoxcall_config=DIR", "--set=knoxcall_config=DIR"])
def test_run_script_takes_the_callers_config_folder(form, folder, upstream, tmp_path) -> None:
    port = free_port()
    given = [part.replace("DIR", str(folder)) for part in form.split(" ")]
    args = [str(ROOT / "scripts" / "run"), *given, "--listen-host", "127.0.0.1", "-p", str(port),
            "--mode", f"reverse:{upstream.url}", "--set", "connection_strategy=lazy"]  # fmt: skip
    with Proxy(args, port, tmp_path / "run.log") as proxy:
        proxy.wait_for_log(f"loaded from {folder}")
        assert get(OFFICE, proxy.url).status_code == 200
        assert get(STRANGER, proxy.url).status_code == 403
        assert [seen["peer"] for seen in upstream.seen] == ["127.0.0.1"]  # the office's one request
    assert "given 2 times" not in proxy.log_text()


def test_run_script_without_a_config_folder_uses_the_repositorys(tmp_path) -> None:
    port = free_port()
    args = [str(ROOT / "scripts" / "run"), "--listen-host", "127.0.0.1", "-p", str(port)]
    with Proxy(args, port, tmp_path / "run.log") as proxy:
        proxy.wait_for_log(f"loaded from {ROOT / 'config'}:")


# -- mitmproxy reloading the -s script ---------------------------------------------------


def rewrite(script: Path, text: str) -> None:
    """Change the script so that mitmproxy's watcher (which compares mtimes each second) reloads it."""
    before = script.stat().st_mtime
    script.write_text(text)
    later = max(before + 2, time.time())
    os.utime(script, (later, later))


@pytest.fixture
def script_copy(tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "script" / "addon.py"
    copy.parent.mkdir()
    copy.write_text(ADDON.read_text())
    yield copy


def assert_refused_inactive(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == INACTIVE


def test_script_reload_that_fails_refuses_everything_until_fixed(folder, upstream, script_copy, tmp_path) -> None:
    original = script_copy.read_text()
    port = free_port()
    with (
        Proxy(proxy_args(folder, port, upstream, script=script_copy), port, tmp_path / "mitm.log") as proxy,
        client_from(OFFICE) as office,  # one keep-alive connection, opened before any reload
    ):
        assert get(OFFICE, proxy.url, office).status_code == 200
        assert get(STRANGER, proxy.url).status_code == 403

        mark = len(proxy.log_text())
        rewrite(script_copy, original + "\n# touched\n")  # a reload that works
        proxy.wait_for_log(f"loaded from {folder}", after=mark)
        assert get(OFFICE, proxy.url, office).status_code == 200
        assert get(STRANGER, proxy.url).status_code == 403
        forwarded = len(upstream.seen)

        for broken in ("raise RuntimeError('broken on purpose')\n", "def broken(:\n"):
            mark = len(proxy.log_text())
            rewrite(script_copy, broken + original)
            proxy.wait_for_log("error in script", after=mark)
            assert_refused_inactive(get(OFFICE, proxy.url, office))  # the open connection
            assert_refused_inactive(get(OFFICE, proxy.url))  # a new one
            assert_refused_inactive(get(STRANGER, proxy.url))
            assert len(upstream.seen) == forwarded
            proxy.wait_for_log(f"knoxcall: refused GET 127.0.0.1/v1/x from {STRANGER}: knoxcall_inactive")

            mark = len(proxy.log_text())
            rewrite(script_copy, original)  # fixed again
            proxy.wait_for_log(f"loaded from {folder}", after=mark)
            assert get(OFFICE, proxy.url, office).status_code == 200
            assert get(STRANGER, proxy.url).status_code == 403
            forwarded += 1
            assert len(upstream.seen) == forwarded


def test_bad_option_found_after_startup_refuses_everything(folder, upstream, script_copy, tmp_path) -> None:
    """KnoxCall's script first loads after startup (here: mitmproxy reloads a script that had no
    KnoxCall yet), when an ERROR no longer stops mitmdump: every request is refused instead."""
    original = script_copy.read_text()
    script_copy.write_text("addons: list = []  # KnoxCall not yet\n")
    port = free_port()
    args = proxy_args(folder, port, upstream, "--set", "knoxcall_reload=no", script=script_copy)
    with Proxy(args, port, tmp_path / "mitm.log") as proxy:
        mark = len(proxy.log_text())
        rewrite(script_copy, original)
        proxy.wait_for_log("knoxcall_reload=no", after=mark)
        forwarded = len(upstream.seen)
        assert_refused_inactive(get(OFFICE, proxy.url))  # KnoxCall allowed it, the guard did not
        assert get(STRANGER, proxy.url).status_code == 403  # KnoxCall's own denial stands
        assert len(upstream.seen) == forwarded
        assert proxy.process is not None and proxy.process.poll() is None  # still up, refusing
