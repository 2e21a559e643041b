"""Issue 9: fail closed on every config mishap, against a real mitmdump/mitmweb and a real upstream.

The config: an open route ``public`` (path ``/``) in base.yaml, and a protected route
``admin`` (path ``/admin``) in admin.yaml. Whenever admin.yaml is lost, half-read or
skipped, ``/admin`` falls to the open route and strangers reach it: each test watches
for exactly that. Traffic only on loopback; every wait is a bounded poll.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from knoxcall_addon.cli import EXIT_FINDINGS, main
from tests.e2e_util import Web
from tests.harness import ROOT, MitmDump, Upstream, client_from, run_mitmdump_expecting_exit

OFFICE = "127.0.0.9"
LAB = "127.0.0.10"
STRANGER = "127.0.0.50"

BASE = """\
environments:
  - name: production
routes:
  - name: public
    requires_clients: false
    match: {path_prefix: /}
"""
ADMIN = """\
clients:
  - name: office
    ip_address: 127.0.0.9
    description: the office
  - name: lab
    ip_address: 127.0.0.10
    description: the lab
routes:
  - name: admin
    match: {path_prefix: /admin}
assignments:
  admin:
    production: [office]
"""
# The same, with the lab assigned too: a change that is easy to see in force.
ADMIN_WITH_LAB = ADMIN.replace("production: [office]", "production: [office, lab]")


def write_config(folder: Path, admin: str = ADMIN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(BASE)
    (folder / "admin.yaml").write_text(admin)
    return folder


def status_of(source: str, proxy: MitmDump, path: str = "/admin") -> int:
    with client_from(source) as client:
        return client.get(proxy.url + path).status_code


def wait_for(predicate: Callable[[], bool], what: str, proxy: MitmDump, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}\n{proxy.log_text()[-4000:]}"
        time.sleep(0.05)


def start_proxy(folder: Path, upstream: Upstream, tmp_path: Path, *extra: str) -> MitmDump:
    return MitmDump(folder, mode=f"reverse:{upstream.url}", log_path=tmp_path / "mitmdump.log", extra=extra).start()


# -- 2. a file still open for writing is never put in force ------------------------------------


def test_a_half_written_file_is_never_put_in_force_however_long_the_writer_takes(tmp_path, upstream):
    """The review's writer: truncate admin.yaml, write its first half (valid YAML without the
    admin route), keep it open well past every debounce, then finish. Until the close, the
    old policy stays in force: no stranger ever reaches /admin."""
    folder = write_config(tmp_path / "config")
    proxy = start_proxy(folder, upstream, tmp_path)
    try:
        assert status_of(STRANGER, proxy) == 403
        assert status_of(STRANGER, proxy, "/public") == 200
        half, rest = ADMIN_WITH_LAB.split("routes:")
        seen: list[int] = []
        with open(folder / "admin.yaml", "w", encoding="utf-8") as f:
            f.write(half)  # valid on its own: two clients, no admin route
            f.flush()
            proxy.wait_for_log("still open for writing", timeout=15)  # the watcher says why it waits
            deadline = time.monotonic() + 4  # past the old 2 s "reading it anyway"
            with client_from(STRANGER) as client:
                while time.monotonic() < deadline:
                    seen.append(client.get(proxy.url + "/admin").status_code)
                    time.sleep(0.05)
            f.write("routes:" + rest)
        assert seen and set(seen) == {403}, seen
        wait_for(lambda: status_of(LAB, proxy) == 200, "the whole file in force", proxy)
        assert status_of(STRANGER, proxy) == 403
        log = proxy.log_text()
        assert "reading it anyway" not in log
        assert "admin.yaml" in next(x for x in log.splitlines() if "still open for writing" in x)
    finally:
        proxy.stop()


# -- 3. every *.yaml entry that is not a readable regular file is a config error ---------------


def _dangling(path: Path) -> str:
    os.symlink(path.parent / "gone.yaml", path)
    return "dangling symlink"


def _loop(path: Path) -> str:
    os.symlink(path.name, path)
    return "symlink loop"


def _directory(path: Path) -> str:
    path.mkdir()
    (path / "x.yaml").write_text("clients: []\n")
    return "is a directory"


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return "is a FIFO"


def _device(path: Path) -> str:
    os.symlink("/dev/zero", path)
    return "is a character device"


def _socket(path: Path) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    return "is a socket"


BAD_ENTRIES: dict[str, Callable[[Path], str]] = {
    "dangling": _dangling,
    "loop": _loop,
    "directory": _directory,
    "fifo": _fifo,
    "device": _device,
    "socket": _socket,
}


def make_bad(folder: Path, kind: str) -> str:
    path = folder / "admin.yaml"
    if path.is_symlink() or path.is_file() or path.exists():
        path.unlink()
    return BAD_ENTRIES[kind](path)


def remove_bad(folder: Path) -> None:
    path = folder / "admin.yaml"
    if path.is_dir() and not path.is_symlink():
        (path / "x.yaml").unlink()
        path.rmdir()
    else:
        path.unlink()


@pytest.mark.parametrize("kind", list(BAD_ENTRIES))
def test_an_unreadable_yaml_entry_refuses_the_start_and_check_says_invalid(tmp_path, kind):
    folder = write_config(tmp_path / "config")
    reason = make_bad(folder, kind)

    out = _check(folder)
    assert out[0] == EXIT_FINDINGS, out[1]
    assert f"{folder / 'admin.yaml'}: error[config]" in out[1] and reason in out[1], out[1]
    assert "config invalid" in out[1]

    refused = run_mitmdump_expecting_exit(folder)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert f"{folder / 'admin.yaml'}: " in output and reason in output, output


def test_an_unreadable_yaml_entry_at_reload_keeps_the_last_good_policy(tmp_path, upstream):
    """Each kind in turn replaces admin.yaml in a running proxy: an error naming the entry,
    /admin stays protected, and the watcher goes on (a FIFO never blocks it)."""
    folder = write_config(tmp_path / "config")
    proxy = start_proxy(folder, upstream, tmp_path)
    try:
        assert status_of(STRANGER, proxy) == 403
        for kind in BAD_ENTRIES:
            mark = len(proxy.log_text())
            reason = make_bad(folder, kind)
            log = proxy.wait_for_log("is invalid, still serving", after=mark)[mark:]
            line = next(x for x in log.splitlines() if "is invalid" in x)
            assert f"{folder / 'admin.yaml'}: " in line and reason in line, (kind, line)
            assert status_of(STRANGER, proxy) == 403, kind
            assert status_of(OFFICE, proxy) == 200, kind
            remove_bad(folder)
            (folder / "admin.yaml").write_text(ADMIN)  # the policy in force, back again
            proxy.wait_for_log("is valid again", after=mark)
        assert proxy.process is not None and proxy.process.poll() is None
    finally:
        proxy.stop()


def _check(folder: Path) -> tuple[int, str]:
    import io

    out = io.StringIO()
    code = main(["check", str(folder)], out=out)
    return code, out.getvalue()


# -- 4. the watcher survives a symlink loop in a release swap ----------------------------------


def swap(link: Path, target: str) -> None:
    """`ln -sfn target link`, atomically (a new link renamed over the old one)."""
    tmp = link.with_name(link.name + ".tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def test_a_moment_of_current_to_current_does_not_stop_hot_reload(tmp_path, upstream):
    """knoxcall_config=.../current with `ln -sfn` releases: a release script that briefly
    points current at itself must not end the watcher; the next release is picked up,
    and knoxcall.status says hot reload is on."""
    write_config(tmp_path / "release-1")
    write_config(tmp_path / "release-2", admin=ADMIN_WITH_LAB)
    current = tmp_path / "current"
    os.symlink("release-1", current)
    with Web(current, upstream.url, tmp_path) as web:
        proxy = web.proxy
        assert status_of(LAB, proxy) == 403
        mark = len(proxy.log_text())
        swap(current, "current")  # current -> current
        line = proxy.wait_for_log("is invalid, still serving", after=mark)[mark:]
        assert "symlink loop" in line
        swap(current, "release-2")
        wait_for(lambda: status_of(LAB, proxy) == 200, "release-2 in force", proxy)
        status = web.run("knoxcall.status")
        assert "hot reload: on, watching" in status and str((tmp_path / "release-2").resolve()) in status, status
        assert "no longer seen" not in status
        # and it keeps going: a later edit in the new release is seen too
        (tmp_path / "release-2" / "admin.yaml").write_text(ADMIN)
        wait_for(lambda: status_of(LAB, proxy) == 403, "the edit in release-2 in force", proxy)
        assert "Traceback" not in proxy.log_text()


# -- 5. a YAML alias bomb is refused, in bounded words, off the event loop -------------------


def alias_bomb(levels: int) -> str:
    """A client description of aliases nested ``levels`` deep: 9**levels strings once expanded."""
    names = "abcdefghij"
    text = "clients:\n  - name: bomb\n    ip_address: 127.0.0.77\n    description:\n"
    text += '      - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, cur in itertools.pairwise(names[:levels]):
        text += f"      - &{cur} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    return text


def test_an_alias_bomb_at_reload_is_refused_with_a_short_message(tmp_path, upstream):
    folder = write_config(tmp_path / "config")
    proxy = start_proxy(folder, upstream, tmp_path)
    try:
        mark = len(proxy.log_text())
        (folder / "bomb.yaml").write_text(alias_bomb(7))
        assert len((folder / "bomb.yaml").read_bytes()) < 600
        log = proxy.wait_for_log("is invalid, still serving", after=mark)[mark:]
        line = next(x for x in log.splitlines() if "is invalid" in x)
        assert f"{folder / 'bomb.yaml'}:" in line and "alias" in line, line[:500]
        assert len(line) < 2000, len(line)
        assert status_of(OFFICE, proxy) == 200 and status_of(STRANGER, proxy) == 403
        # nothing else grew the event log: no 80 MB line anywhere
        assert len(proxy.log_text()) < 100_000
    finally:
        proxy.stop()


def test_an_alias_bomb_refuses_the_start_and_check_prints_a_short_message(tmp_path):
    folder = write_config(tmp_path / "config")
    (folder / "bomb.yaml").write_text(alias_bomb(7))
    code, out = _check(folder)
    assert code == EXIT_FINDINGS
    assert len(out) < 2000, len(out)
    assert f"{folder / 'bomb.yaml'}:" in out and "alias" in out
    refused = run_mitmdump_expecting_exit(folder)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output[:2000]
    assert f"{folder / 'bomb.yaml'}:" in output and "alias" in output
    assert len(output) < 20_000, len(output)


def test_a_large_value_in_an_error_is_cut_short(tmp_path, upstream):
    """Within the alias bound, a list where a string belongs still makes an error that
    quotes the value: the quote is cut short, in check and in the event log."""
    folder = write_config(tmp_path / "config")
    (folder / "bomb.yaml").write_text(alias_bomb(5))  # 59049 strings: within the bound
    code, out = _check(folder)
    assert code == EXIT_FINDINGS
    assert "'description' must be a string" in out and "..." in out
    assert len(out) < 2000, len(out)
    (folder / "bomb.yaml").unlink()
    proxy = start_proxy(folder, upstream, tmp_path)
    try:
        mark = len(proxy.log_text())
        (folder / "bomb.yaml").write_text(alias_bomb(5))
        log = proxy.wait_for_log("is invalid, still serving", after=mark)[mark:]
        line = next(x for x in log.splitlines() if "is invalid" in x)
        assert "'description' must be a string" in line and len(line) < 2000, len(line)
    finally:
        proxy.stop()


# -- 6. dangerous (but valid) configs are served with a WARNING and listed in status ----------

OPEN_CLIENT = ADMIN.replace("ip_address: 127.0.0.10", "ip_address: 0.0.0.0/0").replace(
    "production: [office]", "production: [office, lab]"
)
TRUSTING = BASE + "settings:\n  trusted_proxies: [0.0.0.0/0]\n"


def warnings_in(log: str) -> list[str]:
    return [x for x in log.splitlines() if "knoxcall check calls it an error" in x]


def test_dangerous_findings_are_logged_at_start_and_reload_and_listed_in_status(tmp_path, upstream):
    folder = write_config(tmp_path / "config", admin=OPEN_CLIENT)
    with Web(folder, upstream.url, tmp_path) as web:
        proxy = web.proxy
        assert status_of(STRANGER, proxy) == 200  # served as written: it is valid config
        start = warnings_in(proxy.log_text())
        assert len(start) == 1, proxy.log_text()
        assert f"{folder / 'admin.yaml'}:5: error[open-range]" in start[0] and "0.0.0.0/0" in start[0]
        status = web.run("knoxcall.status")
        assert "dangerous settings (knoxcall check errors): 1" in status, status
        assert "error[open-range]" in status

        mark = len(proxy.log_text())
        (folder / "base.yaml").write_text(TRUSTING)
        wait_for(lambda: len(warnings_in(proxy.log_text()[mark:])) == 2, "two warnings at the reload", proxy)
        reloaded = warnings_in(proxy.log_text()[mark:])
        assert any("error[trusted-proxies]" in x for x in reloaded), reloaded
        assert any("error[open-range]" in x for x in reloaded), reloaded
        status = web.run("knoxcall.status")
        assert "dangerous settings (knoxcall check errors): 2" in status and "error[trusted-proxies]" in status

        mark = len(proxy.log_text())
        (folder / "base.yaml").write_text(BASE)
        (folder / "admin.yaml").write_text(ADMIN)
        wait_for(lambda: status_of(STRANGER, proxy) == 403, "the clean config in force", proxy)
        status = web.run("knoxcall.status")
        assert "dangerous settings (knoxcall check errors): none" in status, status
        assert not warnings_in(proxy.log_text()[mark:])


class QuietMitmDump(MitmDump):
    """A mitmdump whose log may not say "listening at" (termlog_verbosity=warn): started
    when its port accepts connections."""

    def start(self, timeout: float = 30) -> MitmDump:
        import subprocess

        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while not self._accepts():
            assert self.process.poll() is None, self.log_text()
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)
        return self


def test_warn_level_log_shows_the_dangerous_findings(tmp_path, upstream):
    """With termlog_verbosity=warn only WARNING and above reach the log: the finding does."""
    folder = write_config(tmp_path / "config", admin=OPEN_CLIENT)
    proxy = QuietMitmDump(
        folder, mode=f"reverse:{upstream.url}", log_path=tmp_path / "m.log", extra=["--set", "termlog_verbosity=warn"]
    ).start()
    try:
        assert status_of(STRANGER, proxy) == 200
        wait_for(lambda: len(warnings_in(proxy.log_text())) == 1, "the warning", proxy)
        assert "loaded from" not in proxy.log_text()  # the INFO "config ... loaded" line is filtered out
    finally:
        proxy.stop()
