"""The Swagger UI page renders in a real browser, with no network beyond the node."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from lungnode.config import Settings
from lungnode.db.migrate import upgrade
from tests.conftest import require_tool


@pytest.fixture
def server(settings: Settings, make_app: Callable[..., Flask]) -> Iterator[BaseWSGIServer]:
    upgrade(settings.effective_database_url)
    httpd = make_server("127.0.0.1", 0, make_app(settings), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def test_swagger_ui_renders_the_operations(server: BaseWSGIServer, tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    url = f"http://127.0.0.1:{server.server_port}/api/v1/docs"
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    # Rendered by Swagger UI's JavaScript from the node's own copy and openapi.json:
    assert "swagger-ui" in dom and "opblock" in dom, dom[:2000]
    for path in ("/api/v1/auth/login", "/api/v1/predict", "/api/v1/history"):
        assert path in dom
