"""``lungnode serve`` stopped by a signal: clean, bounded, and nothing half-done.

The node runs as a user runs it: a subprocess in its own working directory,
with the relative ``storage/`` of the defaults. A service manager stops a
whole process group (systemd's control group, a terminal's job), so the
ingest workers get the same SIGTERM as the node: that must not read as a
fault. A stop while a job runs takes at most ``stop_timeout_seconds`` (plus
the rest of the stop); the job is then queued again and, after a restart,
completes exactly once.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SENDER_AE
from tests.dicom.helpers import free_port, store_all, wait_until
from tests.support.synthetic import make_ct_series

ROOT = Path(__file__).resolve().parents[2]
LUNGNODE = Path(sys.executable).with_name("lungnode")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    dicom_port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``lungnode serve`` in ``tmp_path`` (its own process group); all gone afterwards."""
    servers: list[Server] = []
    dicom_port = free_port()

    def _start(**settings: str) -> Server:
        env = {
            **os.environ,
            "LUNGNODE_CONFIG": str(tmp_path / "no-config.toml"),
            "LUNGNODE_ENV": "testing",
            "LUNGNODE_DICOM_HOST": "127.0.0.1",
            "LUNGNODE_DICOM_PORT": str(dicom_port),
            "LUNGNODE_HTTP_PORT": str(free_port()),
            "LUNGNODE_PEERS": f"scu={SENDER_AE}@127.0.0.1:{free_port()}",
            "LUNGNODE_MIN_FREE_DISK_MB": "0",
            "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
            "LUNGNODE_SERIES_GRACE_SECONDS": "0.5",
            "LUNGNODE_SERIES_CHECK_INTERVAL": "0.1",
            **{f"LUNGNODE_{name.upper()}": value for name, value in settings.items()},
        }
        log = tmp_path / f"serve-{len(servers)}.log"
        with log.open("wb") as stream:
            process = subprocess.Popen(
                [str(LUNGNODE), "serve"],
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,  # storage/ relative to it, as under `make run`
                start_new_session=True,
            )
        server = Server(process, dicom_port, log)
        servers.append(server)
        ready = wait_until(
            lambda: process.poll() is not None or _port_open(dicom_port), timeout=60, step=0.05
        )
        assert ready and process.poll() is None, f"serve did not start:\n{server.log_text()}"
        return server

    yield _start
    for server in servers:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)


def _query(storage: Path, sql: str) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(f"file:{storage / 'lungnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def _faults(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or " WARNING " in line]


@pytest.mark.parametrize("whole_group", [True, False], ids=["process-group", "node-only"])
def test_sigterm_with_two_ingest_processes_is_a_clean_stop(
    serve: Callable[..., Server], whole_group: bool
) -> None:
    server = serve(ingest_processes="2", workers="0")
    assert wait_until(lambda: "receiving in 2 process(es)" in server.log_text(), timeout=30)
    if whole_group:  # what systemd, or a terminal's job control, does
        os.killpg(server.process.pid, signal.SIGTERM)
    else:
        server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0, server.log_text()
    log = server.log_text()
    assert "stopped" in log.splitlines()[-1], log
    assert _faults(log) == [], log


@pytest.mark.slow
def test_a_stop_during_a_job_is_bounded_and_the_job_completes_once_after_restart(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    bound = 1.0
    # Sent at once after the start, the series' job runs while the model still
    # warms (TensorFlow takes seconds to load): a job that cannot end in time.
    server = serve(stop_timeout_seconds=str(bound), ingest_processes="1")
    datasets = make_ct_series(12, rows=128, columns=128)
    assert store_all(server.dicom_port, datasets) == [0] * 12
    running = wait_until(
        lambda: _query(storage, "SELECT state FROM job") == [("running",)], timeout=30
    )
    assert running, server.log_text()
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0, server.log_text()
    stop_seconds = time.monotonic() - started
    assert stop_seconds < bound + 4.0, f"stop took {stop_seconds:.1f} s:\n{server.log_text()}"
    log = server.log_text()
    assert "left queued for the next start" in log, log
    # Given up before recording: queued again, nothing recorded, nothing to send.
    assert _query(storage, "SELECT state FROM job") == [("queued",)]
    assert _query(storage, "SELECT COUNT(*) FROM prediction") == [(0,)]
    assert _query(storage, "SELECT COUNT(*) FROM delivery") == [(0,)]

    server = serve()
    done = wait_until(
        lambda: _query(storage, "SELECT state FROM job") == [("done",)], timeout=120, step=0.2
    )
    assert done, server.log_text()
    assert _query(storage, "SELECT COUNT(*) FROM prediction") == [(1,)]
    deliveries = _query(storage, "SELECT sop_instance_uid FROM delivery")
    assert len(deliveries) >= 3 and len(set(deliveries)) == len(deliveries)  # SC, PDF, SR
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0, server.log_text()
