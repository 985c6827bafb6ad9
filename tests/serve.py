"""``lungnode serve`` as a real subprocess: the one helper of every test that starts,
kills and restarts the node as a user (or a service manager) runs it.

Each node runs in its own working directory and process group (a service manager
stops or kills the whole group), on ports chosen once, so a restart comes back on
the same ports, storage and database. Every start writes its own log
(``serve-<n>.log``). The ``serve_node`` fixture (tests/conftest.py) makes nodes and
kills every one still running when the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import SENDER_AE, Databases, query
from tests.dicom.helpers import free_port, wait_until
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parents[1]
LUNGNODE = Path(sys.executable).with_name("lungnode")
#: The password of the API's first admin on every served node.
ADMIN_PASSWORD = "drill-admin-password"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _env_name(setting: str) -> str:
    return f"LUNGNODE_{setting.upper()}"


class ServedNode:
    """One node's storage, database and ports, and the ``lungnode serve`` process on them.

    ``settings`` are settings by name (``workers="0"``), for every start; ``start``
    takes more for one start. ``storage=None`` leaves the default relative
    ``storage/`` of the working directory, as ``make run`` has it.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        storage: Path | None = None,
        databases: Databases | None = None,
        peers: str | None = None,
        **settings: str,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.storage = storage if storage is not None else workdir / "storage"
        self.dicom_port, self.http_port = free_ports(2)
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self._token: str | None = None
        if databases is not None:
            self.database = databases.url(self.storage)
            database_env = databases.env(self.storage)
        else:
            self.database = f"sqlite:///{self.storage / 'lungnode.db'}"
            database_env = {}
        self.env = {
            **os.environ,
            "LUNGNODE_CONFIG": str(workdir / "no-config.toml"),
            "LUNGNODE_ENV": "testing",
            "LUNGNODE_DICOM_HOST": "127.0.0.1",
            "LUNGNODE_DICOM_PORT": str(self.dicom_port),
            "LUNGNODE_HTTP_HOST": "127.0.0.1",
            "LUNGNODE_HTTP_PORT": str(self.http_port),
            "LUNGNODE_PEERS": peers or f"scu={SENDER_AE}@127.0.0.1:{free_port()}",
            "LUNGNODE_MIN_FREE_DISK_MB": "0",
            "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
            "LUNGNODE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "LUNGNODE_SERIES_GRACE_SECONDS": "0.5",
            "LUNGNODE_SERIES_CHECK_INTERVAL": "0.1",
            **database_env,
            **{_env_name(name): value for name, value in settings.items()},
        }
        if storage is not None:
            self.env["LUNGNODE_STORAGE_DIR"] = str(storage)
        # Temporary files under the test's own folder: a node killed with SIGKILL
        # (the crash tests) cannot remove TensorFlow's autograph files itself.
        temporary = workdir / "tmp"
        temporary.mkdir(exist_ok=True)
        self.env["TMPDIR"] = str(temporary)

    # -- the process -------------------------------------------------------------

    @property
    def log(self) -> Path:
        """The log of the latest start."""
        return self.workdir / f"serve-{max(self.runs - 1, 0)}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 90.0, **settings: str) -> subprocess.Popen[bytes]:
        """Start ``lungnode serve`` (this start's ``settings`` on top) and wait until
        its SCP listens."""
        assert not self.alive(), "already running"
        env = {**self.env, **{_env_name(name): value for name, value in settings.items()}}
        log = self.workdir / f"serve-{self.runs}.log"
        self.runs += 1
        self._token = None
        with log.open("wb") as stream:
            process = subprocess.Popen(
                [str(LUNGNODE), "serve"],
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,  # a relative storage/ is under it, as under `make run`
                start_new_session=True,  # its own process group, as a service manager has it
            )
        self.process = process
        ready = wait_until(
            lambda: process.poll() is not None or port_open(self.dicom_port),
            timeout=timeout,
            step=0.05,
        )
        assert ready and process.poll() is None, f"serve did not start:\n{self.log_text()}"
        http_up = wait_until(lambda: process.poll() is not None or port_open(self.http_port), 30)
        assert http_up and process.poll() is None, f"serve's API did not start:\n{self.log_text()}"
        return process

    def kill(self, *, whole_group: bool = True) -> None:
        """SIGKILL to the whole process group (the node and its ingest workers), or
        to the node alone."""
        assert self.process is not None, "not started"
        try:
            if whole_group:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        except ProcessLookupError:
            pass
        assert self.process.wait(timeout=30) == -signal.SIGKILL, self.log_text()

    def signal(self, sig: signal.Signals, *, whole_group: bool = False) -> None:
        assert self.process is not None, "not started"
        if whole_group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status, once the node has exited (by itself or a signal)."""
        assert self.process is not None, "not started"
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a service manager stops it; the exit status (``-9`` if it had
        to be killed after ``timeout``)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait(timeout=30)

    def close(self) -> None:
        """Nothing of this node runs afterwards, whatever state it was left in."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)

    def log_text(self) -> str:
        """The log of the latest start."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def logs(self) -> str:
        """The logs of every start, in order."""
        return "\n".join(
            (self.workdir / f"serve-{n}.log").read_text(errors="replace") for n in range(self.runs)
        )

    # -- what it keeps -------------------------------------------------------------

    def query(self, sql: str, **parameters: Any) -> list[tuple[Any, ...]]:
        """Rows of the node's database (none before it is migrated)."""
        return query(self.database, sql, **parameters)

    # -- its API -----------------------------------------------------------------

    def model_state(self) -> str | None:
        """The model's state in ``GET /api/v1/health`` (``warming``, ``ready``,
        ``failed``), or None while the API does not answer."""
        url = f"http://127.0.0.1:{self.http_port}/api/v1/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 503: a check fails
            body = json.load(exc)
        except OSError:
            return None
        state = body["checks"].get("model", {}).get("state")
        return str(state) if state is not None else None

    def wait_model_ready(self, timeout: float = 180.0) -> None:
        ready = wait_until(lambda: self.model_state() == "ready", timeout=timeout, step=0.2)
        assert ready, f"model not ready ({self.model_state()}):\n{self.log_text()}"

    @property
    def base_url(self) -> str:
        """The API's base URL."""
        return f"http://127.0.0.1:{self.http_port}/api/v1"

    def api(self, path: str) -> Any:
        """``GET /api/v1<path>`` as the admin; the JSON answer."""
        if self._token is None:
            login = urllib.request.Request(
                f"http://127.0.0.1:{self.http_port}/api/v1/auth/login",
                data=json.dumps({"username": "admin", "password": ADMIN_PASSWORD}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(login, timeout=30) as response:
                self._token = str(json.load(response)["access_token"])
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/api/v1{path}",
            headers={"Authorization": f"Bearer {self._token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


@contextmanager
def served_nodes(tmp_path: Path) -> Iterator[Callable[..., ServedNode]]:
    """Make :class:`ServedNode` s under ``tmp_path`` (one working directory each);
    every process still running is killed at the end (the ``serve_node`` fixture)."""
    nodes: list[ServedNode] = []

    def _make(**kwargs: Any) -> ServedNode:
        workdir = tmp_path if not nodes else tmp_path / f"node-{len(nodes)}"
        node = ServedNode(workdir, **kwargs)
        nodes.append(node)
        return node

    try:
        yield _make
    finally:
        for node in nodes:
            node.close()
