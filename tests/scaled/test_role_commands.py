"""The role commands as a user runs them: each refuses the wrong queue with a
reason, and ``lungnode api`` serves the API under gunicorn with the workers and
threads its settings name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.error import HTTPError, URLError

import pytest

from tests.dicom.helpers import free_port

LUNGNODE = str(Path(sys.executable).with_name("lungnode"))


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LUNGNODE_")}
    environment.update(
        {
            "LUNGNODE_CONFIG": str(tmp_path / "none.toml"),
            "LUNGNODE_STORAGE_DIR": str(tmp_path / "storage"),
            "LUNGNODE_ENV": "testing",
            **values,
        }
    )
    return environment


@pytest.mark.parametrize("role", ["scp", "worker", "beat"])
def test_a_scaled_role_needs_the_celery_queue(tmp_path: Path, role: str) -> None:
    result = subprocess.run(
        [LUNGNODE, role], env=_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "LUNGNODE_QUEUE=celery" in result.stderr and "lungnode serve" in result.stderr


def test_serve_refuses_the_celery_queue_and_names_the_roles(tmp_path: Path) -> None:
    result = subprocess.run(
        [LUNGNODE, "serve"],
        env=_env(tmp_path, LUNGNODE_QUEUE="celery"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "lungnode scp, api, worker and beat" in result.stderr


def test_worker_refuses_an_unknown_queue(tmp_path: Path) -> None:
    result = subprocess.run(
        [LUNGNODE, "worker", "--queues", "jobs,reports"],
        env=_env(tmp_path, LUNGNODE_QUEUE="celery"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "reports" in result.stderr


@pytest.mark.slow
def test_api_role_serves_with_its_workers_and_threads(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [LUNGNODE, "api"],
        env=_env(
            tmp_path,
            LUNGNODE_QUEUE="celery",
            LUNGNODE_HTTP_PORT=str(port),
            LUNGNODE_API_WORKERS="3",
            LUNGNODE_API_THREADS="2",
            LUNGNODE_ADMIN_PASSWORD="api-role-admin-pw",
            # The limiter counts in the broker's Redis, the machine's own: the default
            # 10 logins a minute for "admin" would be shared with every other run.
            LUNGNODE_RATE_LIMIT_LOGIN="1000/minute",
            LUNGNODE_MODELS_DIR=str(Path(__file__).resolve().parents[2] / "models"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            assert time.monotonic() < deadline, "the api role did not answer"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=5)
                break
            except HTTPError:  # answered (503 without an SCP beside it)
                break
            except URLError:
                time.sleep(0.3)
        # Logins from several connections at once, each on some worker's thread.
        for _ in range(6):
            login = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/v1/auth/login",
                data=json.dumps({"username": "admin", "password": "api-role-admin-pw"}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(login, timeout=10) as response:
                assert "access_token" in json.load(response)
        workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(workers) == 3
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout:
            process.stdout.close()
