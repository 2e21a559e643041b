"""Shared fixtures: config folders written from Python values, and loopback servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import Upstream

ConfigWriter = Callable[..., Path]


def write_yaml(path: Path, data: Any) -> Path:
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigWriter:
    """Write config files into a fresh folder: make_config(**{"clients.yaml": {...} or "text"})."""

    def make(folder: str = "config", **files: Any) -> Path:
        target = tmp_path / folder
        target.mkdir(exist_ok=True)
        for name, data in files.items():
            write_yaml(target / name, data)
        return target

    return make


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream("main") as server:
        yield server
