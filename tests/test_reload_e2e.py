"""Hot reload end to end: a real mitmdump, a real upstream, a real keep-alive client.

Every wait polls with a bound (no fixed sleeps): the new policy is "in force" when a
request on the same connection gets the new decision.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from knoxcall_addon.yamlsource import folder_version
from tests.harness import MitmDump, client_from, free_port

CALLER = "127.0.0.9"
ROUTE = {"x-knoxcall-route": "api"}

BASE = """\
environments:
  - name: production
routes:
  - name: api
"""

# Line numbers matter: the errors below are expected at these lines.
CLIENTS = """\
clients:
  - name: office
    ip_address: {ip}
  - name: lab
    ip_address: 127.0.0.10
assignments:
  api:
    production: [{assigned}]
"""
ALLOWED = CLIENTS.format(ip=CALLER, assigned="office, lab")  # the caller may call api
REFUSED = CLIENTS.format(ip=CALLER, assigned="lab")  # the caller is a known client, not assigned

INVALID = {
    "broken_yaml": (CLIENTS.format(ip=CALLER, assigned="office, lab").replace("]", ""), r"invalid YAML"),
    "unknown_client": (CLIENTS.format(ip=CALLER, assigned="office, ofice"), r":8: .*unknown client 'ofice'"),
    "bad_cidr": (CLIENTS.format(ip="127.0.0.9/24", assigned="office, lab"), r":3: .*has host bits set"),
}


def write_in_place(folder: Path, name: str, text: str) -> None:
    with open(folder / name, "w", encoding="utf-8") as f:  # truncate + write, same inode
        f.write(text)


def write_rename_over(folder: Path, name: str, text: str) -> None:
    """What vim, VS Code and sed -i do: write a temp file, rename it over the original."""
    tmp = folder / f".{name}.swp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / name)


class ConfigMap:
    """A Kubernetes ConfigMap volume: ``x.yaml -> ..data/x.yaml``, ``..data -> ..<timestamp>``."""

    def __init__(self, folder: Path, files: dict[str, str]) -> None:
        self.folder = folder
        self.folder.mkdir()
        self.files = dict(files)
        self.n = 0
        self._publish()
        for name in files:
            os.symlink(f"..data/{name}", folder / name)

    def write(self, folder: Path, name: str, text: str) -> None:
        self.files[name] = text
        self._publish()

    def _publish(self) -> None:
        """Like kubelet's atomic writer: new dir, new ..data_tmp symlink renamed over ..data, old dir removed."""
        self.n += 1
        stamp = f"..2026_11_28_00_00_{self.n:02d}.{self.n}"
        new = self.folder / stamp
        new.mkdir()
        for name, text in self.files.items():
            (new / name).write_text(text, encoding="utf-8")
        data = self.folder / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        os.symlink(stamp, self.folder / "..data_tmp")
        os.replace(self.folder / "..data_tmp", data)
        if old:
            for child in (self.folder / old).iterdir():
                child.unlink()
            (self.folder / old).rmdir()


def get(client: httpx.Client, proxy: MitmDump) -> httpx.Response:
    return client.get(proxy.url + "/x", headers=ROUTE)


def wait_for_status(client: httpx.Client, proxy: MitmDump, status: int, timeout: float = 10) -> httpx.Response:
    """Send requests on the same connection until one gets ``status`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        response = get(client, proxy)
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, f"still {response.status_code} after {timeout}s:\n{proxy.log_text()}"
            return response
        time.sleep(0.05)


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def connections_from(proxy: MitmDump, host: str) -> list[str]:
    """mitmdump's own "client connect" lines for one source address: one per TCP connection."""
    return re.findall(rf"\[{re.escape(host)}:(\d+)\] client connect", proxy.log_text())


def start_proxy(folder: Path, upstream, tmp_path: Path) -> MitmDump:
    return MitmDump(folder, mode=f"reverse:{upstream.url}", access_log=tmp_path / "access.jsonl").start()


Writer = Callable[[Path, str, str], None]


@pytest.mark.parametrize("how", ["in_place", "rename_over", "configmap"])
def test_edit_takes_effect_on_the_open_keep_alive_connection(how, tmp_path, upstream):
    files = {"base.yaml": BASE, "clients.yaml": ALLOWED}
    folder = tmp_path / "config"
    write: Writer
    if how == "configmap":
        write = ConfigMap(folder, files).write
    else:
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        write = write_in_place if how == "in_place" else write_rename_over

    proxy = start_proxy(folder, upstream, tmp_path)
    try:
        with client_from(CALLER) as client:
            first = get(client, proxy)
            assert first.status_code == 200
            port = local_port(first)

            write(folder, "clients.yaml", REFUSED)
            refused = wait_for_status(client, proxy, 403)
            assert refused.json()["error"] == "IP not authorized"
            assert local_port(refused) == port

            write(folder, "clients.yaml", ALLOWED)
            allowed = wait_for_status(client, proxy, 200)
            assert allowed.json()["upstream"] == "main"
            assert local_port(allowed) == port

        # The proxy saw one connection from the caller, so every decision above was
        # made on the same keep-alive connection.
        assert connections_from(proxy, CALLER) == [str(port)]
        log = proxy.log_text()
        assert "clients -" not in log  # the clients stayed; only the assignment changed
        assert "assignments ~api/production(-office)" in log
        assert "assignments ~api/production(+office)" in log
        records = proxy.access_records()
        assert {r["decision"] for r in records} == {"allowed", "denied"}
        # The version is a hash of the contents: the same files again are the same version.
        refused_versions = {r["config_version"] for r in records if r["decision"] == "denied"}
        assert len(refused_versions) == 1
        assert records[0]["config_version"] == records[-1]["config_version"] not in refused_versions
        assert proxy.stop() == 0  # SIGTERM with the watcher running: a clean exit (done stops it)
    finally:
        proxy.stop()


def test_invalid_edits_keep_the_last_good_config_and_fixing_restores_reloading(tmp_path, upstream):
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "base.yaml").write_text(BASE)
    (folder / "clients.yaml").write_text(ALLOWED)
    proxy = start_proxy(folder, upstream, tmp_path)
    try:
        with client_from(CALLER) as client:
            status, good = 200, ALLOWED
            for kind, (text, expected) in INVALID.items():
                mark = len(proxy.log_text())
                write_in_place(folder, "clients.yaml", text)
                log = proxy.wait_for_log("is invalid, still serving", after=mark)[mark:]
                line = next(x for x in log.splitlines() if "is invalid" in x)
                assert re.search(rf"{re.escape(str(folder / 'clients.yaml'))}:\d+: ", line), (kind, line)
                assert re.search(expected, line), (kind, line)
                # The previous decision stays in force, on the same connection.
                assert get(client, proxy).status_code == status, kind
                # Fixing the file (to the other valid policy) is picked up without a restart.
                status, good = (403, REFUSED) if good == ALLOWED else (200, ALLOWED)
                write_in_place(folder, "clients.yaml", good)
                wait_for_status(client, proxy, status)
                proxy.wait_for_log("is valid again", after=mark)
        assert proxy.process is not None and proxy.process.poll() is None  # never dropped
        log = proxy.log_text()
        assert log.count("is invalid, still serving") == len(INVALID)  # one error per bad edit
    finally:
        proxy.stop()


def test_reload_under_load_every_request_matches_its_config_version(tmp_path, upstream):
    """Requests flow without pause while the config flips between two policies and invalid edits."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "base.yaml").write_text(BASE)
    (folder / "clients.yaml").write_text(ALLOWED)

    # The version each valid content gets, and the decision it gives the caller.
    expected: dict[str, str] = {}
    for text, decision in ((ALLOWED, "allowed"), (REFUSED, "denied")):
        probe = tmp_path / f"probe-{decision}"
        probe.mkdir()
        (probe / "base.yaml").write_text(BASE)
        (probe / "clients.yaml").write_text(text)
        expected[folder_version(probe)] = decision

    sequence = [REFUSED, INVALID["broken_yaml"][0], ALLOWED, INVALID["unknown_client"][0], REFUSED,
                INVALID["bad_cidr"][0], ALLOWED]  # fmt: skip
    writes = sequence * 2 + [REFUSED]
    done = threading.Event()

    def writer() -> None:
        try:
            for i, text in enumerate(writes):
                (write_in_place if i % 2 else write_rename_over)(folder, "clients.yaml", text)
                # Some writes come faster than the debounce (coalesced), most slower.
                time.sleep(0.1 if i % 5 == 4 else 0.45)
        finally:
            done.set()

    proxy = start_proxy(folder, upstream, tmp_path)
    try:
        thread = threading.Thread(target=writer, name="test-config-writer")
        responses: list[httpx.Response] = []
        failures: list[str] = []
        deadline = time.monotonic() + 30
        with client_from(CALLER) as client:
            thread.start()
            while len(responses) < 1500 and time.monotonic() < deadline:
                try:
                    responses.append(get(client, proxy))
                except httpx.HTTPError as e:
                    failures.append(f"{type(e).__name__}: {e}")
                time.sleep(0.003)  # spread the bounded request count over the whole write sequence
                if done.is_set() and len(responses) % 20 == 0:
                    break
            thread.join(10)
            # The last write is REFUSED: wait until it is in force, then the log is complete.
            wait_for_status(client, proxy, 403)
        assert not failures, failures[:5]
        assert all(r.status_code in (200, 403) for r in responses), {r.status_code for r in responses}

        by_id = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            by_id = {r["request_id"]: r for r in proxy.access_records()}
            if all(r.headers["x-knoxcall-request-id"] in by_id for r in responses):
                break
            time.sleep(0.05)
        seen_versions = set()
        for response in responses:
            record = by_id[response.headers["x-knoxcall-request-id"]]
            assert record["config_version"] in expected, record
            assert record["decision"] == expected[record["config_version"]], record
            assert record["status"] == response.status_code
            seen_versions.add(record["config_version"])
        assert seen_versions == set(expected)  # both policies were in force during the run

        log = proxy.log_text()
        assert log.count("is invalid, still serving") >= 1
        assert "Traceback" not in log
        assert len(connections_from(proxy, CALLER)) == 1  # one keep-alive connection throughout
    finally:
        proxy.stop()


def test_commands_from_mitmweb_command_bar(tmp_path, upstream):
    """knoxcall.status and knoxcall.reload through mitmweb's command API (what its command bar calls)."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "base.yaml").write_text(BASE)
    (folder / "clients.yaml").write_text(ALLOWED)
    web_port = free_port()
    web = MitmDump(
        folder,
        mode=f"reverse:{upstream.url}",
        tool="mitmweb",
        extra=["--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1",
               "--set", "web_open_browser=false", "--set", "web_password=test-only",
               "--set", "knoxcall_reload=false"],  # only the commands reload: no race with the watcher
    )  # fmt: skip
    with web:
        token = "0123456789abcdef"  # tornado's XSRF check: the cookie and the header must match
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{web_port}",
            headers={"Authorization": "Bearer test-only", "X-XSRFToken": token},
            cookies={"_mitmproxy_xsrf": token},
            timeout=10,
        )
        with api:

            def run(command: str) -> str:
                response = api.post(f"/commands/{command}", json={"arguments": []})
                assert response.status_code == 200, response.text
                return response.json()["value"]

            status = run("knoxcall.status")
            assert f"config folder {folder}" in status
            assert "hot reload: off (knoxcall_reload=false)" in status
            assert "last reload error: none" in status

            write_in_place(folder, "clients.yaml", INVALID["bad_cidr"][0])
            answer = run("knoxcall.reload")
            assert "config invalid, still serving" in answer and "clients.yaml:3:" in answer
            assert "clients.yaml:3:" in run("knoxcall.status")

            write_in_place(folder, "clients.yaml", REFUSED)
            answer = run("knoxcall.reload")
            assert "loaded" in answer and "assignments ~api/production(-office)" in answer


def test_debug_logging_into_the_config_folders_parent_does_not_feed_itself(tmp_path, upstream):
    """The parent folder is watched (for the config folder being replaced). With mitmdump's
    output in that folder and debug verbosity, each of watchdog's own per-event debug lines
    used to be an event again: a log storm at idle. Idle must stay (nearly) quiet."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "base.yaml").write_text(BASE)
    (folder / "clients.yaml").write_text(ALLOWED)
    proxy = MitmDump(
        folder,
        mode=f"reverse:{upstream.url}",
        log_path=tmp_path / "mitmdump.log",  # next to the config folder, in the watched parent
        extra=["--set", "termlog_verbosity=debug"],
    )
    with proxy, client_from(CALLER) as client:
        assert get(client, proxy).status_code == 200  # running, and logging at debug
        time.sleep(1.0)
        before = len(proxy.log_text())
        time.sleep(1.0)
        grown = proxy.log_text()[before:]
    assert "knoxcall: allowed" in proxy.log_text()
    assert len(grown) < 2000, grown[-2000:]
