"""The running API against its own OpenAPI document, with schemathesis.

A real HTTP server on a free localhost port; every operation gets a bounded
number of generated requests as the admin. No response may be a 5xx, and
each must conform to its documented status codes, content type and schema.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from lungnode.api import create_app, ensure_first_admin
from lungnode.config import load_settings
from lungnode.db.migrate import upgrade
from lungnode.db.session import make_engine, make_session_factory
from tests.conftest import Databases

ADMIN_PASSWORD = "schemathesis-admin-password"
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
]


class _Listening:
    """The health check's SCP probe: this server runs without a DICOM side."""

    scp_listening = True


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, module_databases: Databases
) -> Iterator[dict[str, Any]]:
    storage = tmp_path_factory.mktemp("schemathesis")
    settings_ = load_settings(
        **module_databases.settings_overrides(storage),
        env="testing",
        storage_dir=storage,
        admin_password=ADMIN_PASSWORD,
        model=str(tiny_bundle),
        rate_limit_default="100000/minute",
        rate_limit_login="100000/minute",
        peers="pacs=ORTHANC@127.0.0.1:4242",
    )
    upgrade(settings_.effective_database_url)
    engine = make_engine(settings_.effective_database_url)
    ensure_first_admin(make_session_factory(engine), settings_)
    app = create_app(settings_, node_status=_Listening(), engine=engine)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{http.server_port}"
    import requests

    login = requests.post(
        f"{base}/api/v1/auth/login",
        json={"username": "admin", "password": ADMIN_PASSWORD},
        timeout=10,
    )
    login.raise_for_status()
    yield {"base": base, "token": login.json()["access_token"]}
    http.shutdown()
    thread.join(timeout=10)
    engine.dispose()


def test_api_conforms_to_its_openapi_document(server: dict[str, Any], tmp_path: Path) -> None:
    """schemathesis's own runner (its CLI) against the live server, bounded in examples."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server['base']}/api/v1/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        "15",
        "--seed",
        "20240601",
        "--request-timeout",
        "30",
        "--generation-database",
        ":memory:",
        "--header",
        f"Authorization: Bearer {server['token']}",
        "--no-color",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "passed" in output.lower() or "no issues found" in output.lower(), output[-3000:]
