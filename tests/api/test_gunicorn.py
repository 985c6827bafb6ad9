"""The API stands alone under gunicorn, as `docs/api.md` says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.error import HTTPError, URLError

from tests.conftest import Databases

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_wsgi_app_serves_under_gunicorn(tmp_path: Path, databases: Databases) -> None:
    port, dicom_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "LUNGNODE_CONFIG": str(tmp_path / "none.toml"),
        "LUNGNODE_ENV": "testing",
        "LUNGNODE_STORAGE_DIR": str(tmp_path / "storage"),
        "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
        "LUNGNODE_DICOM_PORT": str(dicom_port),
        "LUNGNODE_MIN_FREE_DISK_MB": "0",
        "LUNGNODE_ADMIN_PASSWORD": "standalone-admin-pw",
        **databases.env(tmp_path / "storage"),
    }
    gunicorn = Path(sys.executable).with_name("gunicorn")
    process = subprocess.Popen(
        [
            str(gunicorn),
            "--preload",
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
            "lungnode.app.wsgi:app",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        body = None
        while body is None:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            assert time.monotonic() < deadline, "gunicorn did not answer"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=5)
            except HTTPError as exc:  # 503: no SCP listens beside a standalone API
                body = json.load(exc)
            except URLError:
                time.sleep(0.3)
        assert body["failing"] == ["scp"]
        assert body["checks"]["database"]["ok"] and body["checks"]["model"]["ok"]
        login = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/auth/login",
            data=json.dumps({"username": "admin", "password": "standalone-admin-pw"}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(login, timeout=10) as response:
            assert "access_token" in json.load(response)
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout:
            process.stdout.close()
