"""Shared fixtures: settings on a temporary storage, a running node on free ports,
and access to the real peers (DCMTK, dicom3tools) the tests use."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lungnode.app.node import Node
from lungnode.config import Settings, load_settings

#: The calling AE title the tests' SCUs use; it is a configured peer of the node.
SENDER_AE = "TESTSCU"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """Path of an external tool; missing fails under CI=true, skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: dcmtk, dicom3tools or orthanc)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def _make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "env": "testing",
            "storage_dir": tmp_path / "storage",
            "dicom_host": "127.0.0.1",
            "dicom_port": 0,
            "http_port": 0,
            "peers": f"scu={SENDER_AE}@127.0.0.1:11119",
            "min_free_disk_mb": 0,
            "series_quiet_seconds": 5.0,
            "series_grace_seconds": 0.5,
            "series_check_interval": 0.1,
            # One receiving process unless a test asks for more (ingest_workers tests).
            "ingest_processes": 1,
            "models_dir": Path(__file__).resolve().parents[1] / "models",
        }
        values.update(overrides)
        return load_settings(**values)

    return _make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def start_node() -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def _start(settings: Settings, **kwargs: Any) -> Node:
        node = Node(settings, **kwargs)
        node.start()
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.stop()


@pytest.fixture
def node(settings: Settings, start_node: Callable[..., Node]) -> Node:
    return start_node(settings, serve_http=False)
