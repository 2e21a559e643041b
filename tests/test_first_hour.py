"""Issue 10, "the first hour of a new user": what a newcomer types first must work, and
what goes wrong must say so in words they can act on.

The CLI runs for real (its ``main()``, and as a subprocess where the working directory
matters); the addon's words come from a real ``KnoxCall`` in mitmproxy's test context.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from knoxcall_addon.cli import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, main
from knoxcall_addon.loader import load_config
from knoxcall_addon.model import ConfigError
from knoxcall_addon.proxy_addon import KnoxCall
from tests.harness import BIN

# A newcomer's first config: a client, a route, an assignment in production.
FIRST = """\
environments: [{name: production}]
clients:
  - name: office
    ip_address: 127.0.0.0/29
  - name: old-office
    ip_address: 127.0.1.0/24
    enabled: false
routes:
  - name: orders
assignments:
  orders:
    production: [office, old-office]
"""


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def knoxcall(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script, run from ``cwd``."""
    exe = BIN / "knoxcall"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "knoxcall_addon.cli"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture
def first(tmp_path: Path) -> Path:
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "knoxcall.yaml").write_text(FIRST, encoding="utf-8")
    return folder


def addon_error(folder: str) -> str:
    """What the addon says when ``knoxcall_config`` is set to ``folder`` (it must refuse)."""
    addon = KnoxCall()
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError) as caught:
        tctx.configure(addon, knoxcall_config=folder)
    return str(caught.value)


# -- the config folder, taken the same way by every command -------------------------------


def test_every_command_takes_the_folder_positionally_or_with_config(first):
    explain = ["explain", "--ip", "127.0.0.3", "--route", "orders"]
    for argv in ([*explain, str(first)], [str(first), *explain[1:]], [*explain, "--config", str(first)]):
        if argv[0] != "explain":
            argv = ["explain", *argv]
        code, out = run(*argv)
        assert code == EXIT_OK, (argv, out)
        assert out.startswith("ALLOWED: client"), out
    for command in ("check", "ping"):
        by_option = run(command, "--config", str(first))
        by_position = run(command, str(first))
        assert by_option == by_position
        assert by_option[0] == EXIT_OK, by_option
    # the same folder twice is fine; two different ones are a usage error, not a guess
    assert run("check", str(first), "--config", str(first))[0] == EXIT_OK
    assert run("check", str(first), "--config", str(first.parent))[0] == EXIT_USAGE


def test_explain_with_the_folder_last_as_a_console_script(first):
    """Exactly what issue 10 typed: it was "unrecognized arguments"."""
    result = knoxcall("explain", "--ip", "127.0.0.3", "--route", "orders", first.name, cwd=first.parent)
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith("ALLOWED: client")


# -- what is wrong with the folder itself: the same words from the CLI and the addon ------


def test_a_missing_folder_is_named_by_its_full_path(tmp_path):
    result = knoxcall("check", "nope", cwd=tmp_path)
    assert result.returncode == EXIT_FINDINGS
    assert f"{tmp_path}/nope: error[config] config folder does not exist" in result.stdout
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope")
    assert str(caught.value) == f"{tmp_path}/nope: config folder does not exist"
    assert f"{tmp_path}/nope: config folder does not exist" in addon_error(str(tmp_path / "nope"))


def test_a_file_is_not_a_folder(first):
    file = first / "knoxcall.yaml"
    result = knoxcall("check", "cfg/knoxcall.yaml", cwd=first.parent)
    assert result.returncode == EXIT_FINDINGS
    expected = f"{file}: the config folder is a file, not a folder; name the folder that holds it, {first}"
    assert f"{file}: error[config] the config folder is a file, not a folder; name the folder" in result.stdout
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    assert str(caught.value) == expected
    assert expected in addon_error(str(file))
    other = first.parent / "notes.txt"
    other.write_text("x")
    code, out = run("explain", "--ip", "127.0.0.3", "--route", "orders", str(other))
    assert code == EXIT_FINDINGS
    assert out == f"{other}: error[config] the config folder is a file, not a folder\n"


def test_a_broken_symlink_says_so(tmp_path):
    (tmp_path / "current").symlink_to(tmp_path / "release-9")
    code, out = run("check", str(tmp_path / "current"))
    assert code == EXIT_FINDINGS
    assert f"{tmp_path}/current: error[config] the config folder is a broken symlink" in out


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_folder_name_is_refused_not_read_as_the_working_directory(tmp_path, first, empty):
    # the working directory holds a valid config: '' used to load it (Path('') is '.')
    result = knoxcall("check", empty, cwd=first)
    assert result.returncode == EXIT_FINDINGS
    assert result.stdout.splitlines() == [
        '"": error[config] the config folder name is empty: name a folder, e.g. config',
        '"": config invalid; 1 error(s), 0 warning(s)',
    ]
    assert "is empty: name a folder" in knoxcall("explain", "--ip", "127.0.0.3", "--route", "orders", "--config",
                                                 empty, cwd=first).stdout  # fmt: skip
    assert "the config folder name is empty: name a folder" in addon_error(empty)


def test_an_empty_folder_still_says_it_has_no_files_by_its_full_path(tmp_path):
    (tmp_path / "empty").mkdir()
    result = knoxcall("check", "empty", cwd=tmp_path)
    assert f"{tmp_path}/empty: error[config] no config files (*.yaml, *.yml) in this folder" in result.stdout
    assert os.path.isabs(result.stdout.split(":", 1)[0])
