"""The access log writes every record, and says when it cannot (issue 8, finding 6).

Real files only: a temporary file, /dev/full (every write fails with ENOSPC), and a
child process under a file size limit (RLIMIT_FSIZE), where a line is cut off part way
and writing works again once the limit is raised.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from knoxcall_addon.accesslog import ACCESS_LOG_FIELDS, AccessLog, printable


@given(raw=st.binary(max_size=40))
@example(raw=b"caf\xe9")
@example(raw=b"\xc3(")
@example(raw="caf\u00e9 \u2603".encode())
@example(raw=b"a\\xffb")
def test_printable_writes_the_bytes_received(raw: bytes) -> None:
    """A value as the proxy decodes a header (UTF-8, surrogateescape) comes out as Python's
    backslashreplace of the bytes received: valid UTF-8 unchanged, other bytes as \\xHH."""
    text = printable(raw.decode("utf-8", "surrogateescape"))
    assert text == raw.decode("utf-8", "backslashreplace")
    text.encode("utf-8")  # encodable: no lone surrogate left


def test_printable_other_surrogates() -> None:
    assert printable("a\ud800b") == "a\\ud800b"
    assert printable("plain") == "plain"


def record(**values: object) -> dict[str, object]:
    return {"request_id": "r1", "decision": "allowed", **values}


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


def test_surrogates_in_every_text_field_are_escaped(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "access.jsonl")
    bad = "x\udcff\udce9"  # the bytes ff e9, as surrogateescape gives them
    log.write(record(**{**{name: bad for name in ACCESS_LOG_FIELDS}, "latency_ms": 1.5}))
    log.write(record(user_agent="caf\u00e9", path="/v1"))
    log.close()
    first, second = lines(tmp_path / "access.jsonl")
    assert first["latency_ms"] == 1.5
    assert {name: value for name, value in first.items() if name != "latency_ms"} == {
        name: "x\\xff\\xe9" for name in ACCESS_LOG_FIELDS if name != "latency_ms"
    }
    # a line UTF-8 can encode is written as before: raw UTF-8, nothing escaped
    raw_second = (tmp_path / "access.jsonl").read_bytes().splitlines()[1]
    assert raw_second == json.dumps(
        {name: record(user_agent="caf\u00e9", path="/v1").get(name) for name in ACCESS_LOG_FIELDS},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
    assert second["user_agent"] == "caf\u00e9"


def test_a_failing_file_is_logged_once_per_burst(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog("/dev/full")
    with caplog.at_level(logging.INFO, logger="knoxcall"):
        for i in range(50):
            log.write(record(request_id=str(i)))  # never raises
        assert log.lost == 50
        log.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert "cannot write the access log /dev/full: OSError: [Errno 28] No space left on device" in errors[0]
    assert errors[1] == "knoxcall: the access log /dev/full is closed; its last 50 lines were lost"


def test_a_closed_log_is_not_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog(tmp_path / "access.jsonl")
    log._file.close()  # as if the file went away under it
    with caplog.at_level(logging.ERROR, logger="knoxcall"):
        log.write(record())
    assert "cannot write the access log" in caplog.text
    assert log.lost == 1


CHILD = textwrap.dedent(
    """
    import logging, resource, signal, sys
    from knoxcall_addon.accesslog import AccessLog

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    path = sys.argv[1]
    log = AccessLog(path)
    log.write({"request_id": "before"})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    size = log.path.stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))  # the next line fits in part
    for i in range(3):
        log.write({"request_id": f"lost-{i}"})
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    log.write({"request_id": "after"})
    log.write({"request_id": "after-2"})
    log.close()
    """
)


def test_a_burst_of_failures_then_recovery(tmp_path: Path) -> None:
    """A line cut off by the file size limit, two more lost, then writing works again:
    one ERROR at the first failure, one with the count when it works again; the torn
    line stays one bad line and the next line starts on its own."""
    path = tmp_path / "access.jsonl"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    errors = [line for line in child.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, child.stdout
    assert "cannot write the access log" in errors[0] and "File too large" in errors[0]
    assert errors[1].endswith("is written again; 3 lines were lost")
    raw = path.read_bytes().decode("utf-8").splitlines()
    assert json.loads(raw[0])["request_id"] == "before"
    assert raw[1].startswith('{"ts":null,"request_id":"lost-0"') and len(raw[1]) == 40  # the torn line
    assert [json.loads(line)["request_id"] for line in raw[2:]] == ["after", "after-2"]


# -- rotation (logrotate moves the file; the log follows the path) -------------------------


@pytest.fixture
def check_every_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Look at the path before every write instead of once a second."""
    monkeypatch.setattr("knoxcall_addon.accesslog.ROTATION_CHECK_SECONDS", 0.0)


def ids(path: Path) -> list[object]:
    return [record["request_id"] for record in lines(path)]


def test_a_moved_file_is_followed_by_a_new_one(
    tmp_path: Path, check_every_write: None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(path)
    log.write(record(request_id="before"))
    path.rename(tmp_path / "access.jsonl.1")  # logrotate's default: move, then create (or not)
    with caplog.at_level(logging.INFO, logger="knoxcall"):
        log.write(record(request_id="after"))
        log.write(record(request_id="after-2"))
    log.close()
    assert ids(tmp_path / "access.jsonl.1") == ["before"]
    assert ids(path) == ["after", "after-2"]
    moved = [r.getMessage() for r in caplog.records if "moved or removed" in r.getMessage()]
    assert len(moved) == 1


def test_a_file_created_by_logrotate_is_written_and_a_removed_one_is_made_again(
    tmp_path: Path, check_every_write: None
) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(path)
    log.write(record(request_id="one"))
    path.rename(tmp_path / "old")
    path.write_bytes(b"")  # logrotate's create
    log.write(record(request_id="two"))
    path.unlink()
    log.write(record(request_id="three"))
    log.close()
    assert ids(tmp_path / "old") == ["one"]
    assert ids(path) == ["three"]


def test_copytruncate_needs_nothing(tmp_path: Path, check_every_write: None) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(path)
    log.write(record(request_id="one"))
    (tmp_path / "copy").write_bytes(path.read_bytes())
    with path.open("r+b") as f:
        f.truncate(0)
    log.write(record(request_id="two"))
    log.close()
    assert path.read_bytes().startswith(b'{"ts"')  # appended at the new end, no hole before it
    assert ids(path) == ["two"]


def test_a_path_that_cannot_be_opened_again_keeps_the_moved_file(
    tmp_path: Path, check_every_write: None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(path)
    log.write(record(request_id="one"))
    path.rename(tmp_path / "moved")
    path.mkdir()  # the path cannot be a file now (root ignores permissions: a directory stops it)
    with caplog.at_level(logging.INFO, logger="knoxcall"):
        for i in range(5):
            log.write(record(request_id=f"kept-{i}"))  # never raises
        assert log.lost == 0
        path.rmdir()
        log.write(record(request_id="new"))
    log.close()
    assert ids(tmp_path / "moved") == ["one", *(f"kept-{i}" for i in range(5))]
    assert ids(path) == ["new"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot be opened again" in errors[0] and "IsADirectoryError" in errors[0]


def test_the_path_is_looked_at_once_a_second_not_per_line(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(path)
    log.write(record(request_id="one"))
    path.rename(tmp_path / "moved")
    log.write(record(request_id="two"))  # within the second: still the moved file
    log._check_at = 0.0  # as if a second had passed
    log.write(record(request_id="three"))
    log.close()
    assert ids(tmp_path / "moved") == ["one", "two"]
    assert ids(path) == ["three"]
