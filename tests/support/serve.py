"""``lungnode serve`` as a real process for a test: its ports, its log, its end.

The e2e tests and the drills run the node the way an operator does, in a
process of its own, so that what the node logs can be read back and a crash
shows as a dead process rather than a dead test run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.dicom.helpers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
LUNGNODE = Path(sys.executable).with_name("lungnode")


def port_open(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class ServeProcess:
    """One ``lungnode serve`` process (in a session of its own) and where it listens and logs."""

    process: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int
    log: Path

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/api/v1"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL to the whole session if it has not ended after ``timeout``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait(timeout=timeout)


def start_serve(
    workdir: Path, storage: Path, *, env: dict[str, str], name: str = "serve"
) -> ServeProcess:
    """Start ``lungnode serve`` on free ports with the settings in ``env`` (``LUNGNODE_*``)
    on top of a test node's; returns once its DICOM port accepts connections."""
    dicom_port, http_port = free_port(), free_port()
    environment = {
        **os.environ,
        "LUNGNODE_CONFIG": str(workdir / "no-config.toml"),
        "LUNGNODE_ENV": "testing",
        "LUNGNODE_STORAGE_DIR": str(storage),
        "LUNGNODE_DICOM_HOST": "127.0.0.1",
        "LUNGNODE_DICOM_PORT": str(dicom_port),
        "LUNGNODE_HTTP_PORT": str(http_port),
        "LUNGNODE_MIN_FREE_DISK_MB": "0",
        "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
        "LUNGNODE_INGEST_PROCESSES": "1",
        **env,
    }
    log = workdir / f"{name}.log"
    with log.open("wb") as stream:
        process = subprocess.Popen(
            [str(LUNGNODE), "serve"],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=workdir,
            start_new_session=True,
        )
    server = ServeProcess(process, dicom_port, http_port, log)
    ready = wait_until(
        lambda: process.poll() is not None or (port_open(dicom_port) and port_open(http_port)),
        timeout=90,
        step=0.1,
    )
    if not ready or process.poll() is not None:
        server.stop()
        raise AssertionError(f"lungnode serve did not start:\n{server.log_text()}")
    return server
