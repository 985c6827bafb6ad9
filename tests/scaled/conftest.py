"""The scaled roles as real processes: a Redis of the test's own, ``lungnode scp``,
``api``, ``worker`` and ``beat`` subprocesses on one shared storage and database.

Each test starts its own ``redis-server`` on a free port (never the machine's
shared one), so stopping the broker for an outage test disturbs nobody. Under
CI=true a missing ``redis-server`` fails the test instead of skipping it.

The database is the ``databases`` fixture's (``tests/conftest.py``): the storage
folder's SQLite file in the first pass of ``make test``, a fresh PostgreSQL
database of the test's own in the second (``LUNGNODE_TEST_DATABASE=postgresql``),
the backend the scaled roles are meant for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import pytest

from tests.conftest import SENDER_AE, Databases, require_tool
from tests.conftest import query as database_query
from tests.dicom.helpers import free_port, wait_until
from tests.serve import port_open

ROOT = Path(__file__).resolve().parents[2]
LUNGNODE = Path(sys.executable).with_name("lungnode")
#: The first admin of the roles' database (``ensure_first_admin``).
ADMIN_PASSWORD = "scaled-admin-password"


class Redis:
    """One redis-server of the test's own, without persistence: a restart loses
    every message, as a broker that crashed would."""

    def __init__(self, executable: str, work: Path) -> None:
        self.executable = executable
        self.work = work
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        work.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with (self.work / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.work),
                ],
                stdout=log,
                stderr=log,
            )
        assert wait_until(lambda: port_open(self.port), timeout=15), "redis did not start"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def llen(self, queue: str) -> int:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            return int(client.llen(queue))
        finally:
            client.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(require_tool("redis-server"), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@dataclass
class Role:
    """One ``lungnode <role>`` process and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    dicom_port: int | None = None
    http_port: int | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []


@dataclass
class Cluster:
    """The roles of one test, on one storage folder and one broker."""

    tmp_path: Path
    broker: Redis
    storage: Path
    databases: Databases
    settings: dict[str, str] = field(default_factory=dict)
    roles: list[Role] = field(default_factory=list)

    def env(self, **overrides: str) -> dict[str, str]:
        values = {
            **os.environ,
            "LUNGNODE_CONFIG": str(self.tmp_path / "no-config.toml"),
            "LUNGNODE_ENV": "testing",
            "LUNGNODE_LOG_LEVEL": "INFO",
            "LUNGNODE_STORAGE_DIR": str(self.storage),
            "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
            "LUNGNODE_QUEUE": "celery",
            "LUNGNODE_BROKER_URL": self.broker.url,
            "LUNGNODE_DICOM_HOST": "127.0.0.1",
            "LUNGNODE_PEERS": f"scu={SENDER_AE}@127.0.0.1:11119",
            "LUNGNODE_MIN_FREE_DISK_MB": "0",
            "LUNGNODE_INGEST_PROCESSES": "1",
            "LUNGNODE_SERIES_QUIET_SECONDS": "4",
            "LUNGNODE_SERIES_GRACE_SECONDS": "0.5",
            "LUNGNODE_SERIES_CHECK_INTERVAL": "0.1",
            "LUNGNODE_JOB_CHECK_INTERVAL": "0.5",
            "LUNGNODE_DELIVERY_CHECK_INTERVAL": "0.5",
            "LUNGNODE_DELIVERY_RETRY_BASE_SECONDS": "0.5",
            "LUNGNODE_JOB_RETRY_BASE_SECONDS": "1",
            "LUNGNODE_JOB_LEASE_SECONDS": "6",
            "LUNGNODE_QUEUE_RESEND_SECONDS": "3",
            "LUNGNODE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            # The api role: one gunicorn worker is enough for a test's requests.
            "LUNGNODE_HTTP_HOST": "127.0.0.1",
            "LUNGNODE_API_WORKERS": "1",
            "LUNGNODE_API_THREADS": "4",
            # One thread of TensorFlow per worker: two workers share the test host's cores.
            "TF_NUM_INTRAOP_THREADS": "1",
            "TF_NUM_INTEROP_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        values.update(self.databases.env(self.storage))
        values.update(self.settings)
        values.update(overrides)
        return values

    @property
    def database_url(self) -> str:
        return self.databases.url(self.storage)

    def start(self, role: str, *args: str, **env: str) -> Role:
        """Start ``lungnode <role>``; an scp or an api gets a free port and is waited for."""
        dicom_port = free_port() if role == "scp" else None
        http_port = free_port() if role == "api" else None
        if dicom_port is not None:
            env = {"LUNGNODE_DICOM_PORT": str(dicom_port), **env}
        if http_port is not None:
            env = {"LUNGNODE_HTTP_PORT": str(http_port), **env}
        log = self.tmp_path / f"{role}-{len(self.roles)}.log"
        with log.open("wb") as stream:
            process = subprocess.Popen(
                [str(LUNGNODE), role, *args],
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=self.env(**env),
                cwd=self.tmp_path,
                start_new_session=True,
            )
        started = Role(role, process, log, dicom_port, http_port)
        self.roles.append(started)
        port = dicom_port or http_port
        if port is not None:
            ready = wait_until(
                lambda: process.poll() is not None or port_open(port), timeout=60, step=0.1
            )
            assert ready and process.poll() is None, f"{role} did not start:\n{started.log_text()}"
        return started

    def wait_for_log(self, role: Role, text: str, timeout: float) -> None:
        ok = wait_until(
            lambda: text in role.log_text() or role.process.poll() is not None, timeout, step=0.5
        )
        assert ok and role.process.poll() is None, f"{role.name}: no {text!r}:\n{role.log_text()}"

    def logs(self) -> str:
        return "\n".join(
            f"===== {r.name} ({r.log.name})\n{r.log_text()[-6000:]}" for r in self.roles
        )

    def query(self, sql: str, **parameters: object) -> list[tuple[Any, ...]]:
        """Rows of one statement (``:name`` parameters) on the roles' database."""
        return database_query(self.database_url, sql, **parameters)

    def stop_all(self) -> None:
        for role in self.roles:
            if role.process.poll() is None:
                os.killpg(role.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for role in self.roles:
            try:
                role.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(role.process.pid, signal.SIGKILL)
                role.process.wait(timeout=10)
            try:  # a pool child that outlived its parent
                os.killpg(role.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def cluster(tmp_path: Path, broker: Redis, databases: Databases) -> Iterator[Cluster]:
    group = Cluster(tmp_path, broker, tmp_path / "storage", databases)
    yield group
    group.stop_all()


WaitFor = Callable[[Callable[[], bool], float, str], None]


@pytest.fixture
def wait_for(cluster: Cluster) -> WaitFor:
    """Wait for a condition; on timeout fail with every role's log."""

    def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        if not wait_until(predicate, timeout=timeout, step=0.25):
            pytest.fail(f"timed out waiting for {what}\n{cluster.logs()}")

    return _wait


class APIClient:
    """Requests to an ``api`` role, as one user with a bearer token."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self.token = token

    def request(
        self, method: str, path: str, body: Any = None, *, files: list[tuple[str, bytes]] = ()
    ) -> tuple[int, Any]:
        """``(status, decoded JSON)``; ``files``: multipart fields named ``file``."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = None
        if files:
            boundary = "lungnode-test-boundary"
            parts = []
            for name, content in files:
                parts.append(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                    + content
                    + b"\r\n"
                )
            data = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.base + path, data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def login(self, username: str, password: str) -> APIClient:
        status, body = self.request(
            "POST", "/auth/login", {"username": username, "password": password}
        )
        assert status == 200, body
        return APIClient(int(self.base.split(":")[2].split("/")[0]), body["access_token"])
