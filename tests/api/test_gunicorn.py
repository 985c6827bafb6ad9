"""The API stands alone under gunicorn, as `docs/api.md` says; as the ``api`` role
(gunicorn_conf) its workers share rate limits (Redis) and metrics, over HTTPS."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError

import pytest

from lungnode.api.metrics import Metrics
from lungnode.app.api_server import gunicorn_options
from lungnode.app.metrics_dir import ENV, use_metrics_dir
from lungnode.config import Settings
from lungnode.errors import ConfigError
from tests.api.conftest import ServerCertificate, require_redis
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


@dataclass
class APIRole:
    """``gunicorn -c python:lungnode.app.gunicorn_conf``: two workers, HTTPS, Redis."""

    port: int
    context: ssl.SSLContext
    access_log: Path

    def request(self, path: str, **kwargs: Any) -> tuple[int, bytes]:
        request = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}", **kwargs)
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                return response.status, response.read()
        except HTTPError as exc:
            return exc.code, exc.read()

    def workers_that_answered(self, path: str, status: int) -> set[str]:
        """Worker pids from the access log (format: pid status path)."""
        pids = set()
        for line in self.access_log.read_text().splitlines():
            pid, code, logged_path = line.split(" ", 2)
            if code == str(status) and logged_path == path:
                pids.add(pid)
        return pids


@pytest.fixture(scope="module")
def api_role(
    tmp_path_factory: pytest.TempPathFactory, server_certificate: ServerCertificate
) -> Iterator[APIRole]:
    redis_url = require_redis()
    directory = tmp_path_factory.mktemp("api-role")
    port = _free_port()
    access_log = directory / "access.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LUNGNODE_", "PROMETHEUS"))},
        "LUNGNODE_CONFIG": str(directory / "none.toml"),
        "LUNGNODE_ENV": "production",
        "LUNGNODE_SECRET_KEY": "a-production-secret-of-32-chars!",
        "LUNGNODE_STORAGE_DIR": str(directory / "storage"),
        "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
        "LUNGNODE_ADMIN_PASSWORD": "standalone-admin-pw",
        "LUNGNODE_HTTP_HOST": "127.0.0.1",
        "LUNGNODE_HTTP_PORT": str(port),
        "LUNGNODE_HTTP_TLS_CERT": str(server_certificate.cert),
        "LUNGNODE_HTTP_TLS_KEY": str(server_certificate.key),
        "LUNGNODE_API_WORKERS": "2",
        "LUNGNODE_API_THREADS": "2",
        "LUNGNODE_RATE_LIMIT_STORAGE_URI": redis_url,
        "LUNGNODE_RATE_LIMIT_LOGIN": f"{LOGIN_LIMIT}/minute",
        # The test's own client address (X-Forwarded-For) keeps its counts apart.
        "LUNGNODE_TRUSTED_PROXIES": "127.0.0.1",
    }
    gunicorn = Path(sys.executable).with_name("gunicorn")
    process = subprocess.Popen(
        [
            str(gunicorn),
            "-c",
            "python:lungnode.app.gunicorn_conf",
            "--access-logfile",
            str(access_log),
            "--access-logformat",
            "%(p)s %(s)s %(U)s",
        ],
        env=env,
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    role = APIRole(
        port, ssl.create_default_context(cafile=str(server_certificate.cert)), access_log
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            assert time.monotonic() < deadline, "gunicorn did not answer"
            try:
                role.request("/api/v1/openapi.json")
                break
            except URLError:
                time.sleep(0.3)
        yield role
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout:
            process.stdout.close()


LOGIN_LIMIT = 5


def _spread(call: Callable[[], Any], until: Callable[[], bool], most: int) -> int:
    """Call from 4 threads (so both workers take some) until ``until()``; returns the calls."""
    calls = 0
    with ThreadPoolExecutor(4) as pool:
        while calls < most and not until():
            list(pool.map(lambda _: call(), range(8)))
            calls += 8
    return calls


def test_metrics_are_summed_over_the_workers(api_role: APIRole) -> None:
    def health_count() -> float:
        status, body = api_role.request("/api/v1/metrics")
        assert status == 200
        pattern = re.compile(
            r'^lungnode_http_request_duration_seconds_count\{(?=[^}]*route="/api/v1/health")'
            r'(?=[^}]*status="503")[^}]*\} (\S+)$',
            re.MULTILINE,
        )
        match = pattern.search(body.decode())
        return float(match.group(1)) if match else 0.0

    before = health_count()
    sent = _spread(
        lambda: api_role.request("/api/v1/health"),
        lambda: len(api_role.workers_that_answered("/api/v1/health", 503)) == 2,
        most=400,
    )
    assert len(api_role.workers_that_answered("/api/v1/health", 503)) == 2
    # Whichever worker answers the scrape, it counts every worker's requests.
    assert [health_count() - before for _ in range(4)] == [sent] * 4


def test_login_limit_holds_across_workers(api_role: APIRole) -> None:
    client = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    body = json.dumps({"username": f"u-{uuid.uuid4().hex[:12]}", "password": "wrong"}).encode()
    statuses: list[int] = []

    def login() -> None:
        status, _ = api_role.request(
            "/api/v1/auth/login",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "X-Forwarded-For": client},
        )
        statuses.append(status)

    _spread(
        login,
        lambda: len(api_role.workers_that_answered("/api/v1/auth/login", 429)) == 2,
        most=200,
    )
    assert len(api_role.workers_that_answered("/api/v1/auth/login", 429)) == 2
    assert set(statuses) == {401, 429}
    assert statuses.count(401) == LOGIN_LIMIT, "each worker counted on its own"


def test_gunicorn_options_follow_the_settings(
    make_settings: Callable[..., Settings], server_certificate: ServerCertificate
) -> None:
    from gunicorn.config import Config

    settings = make_settings(
        http_host="::",
        http_port=8443,
        api_workers=3,
        api_threads=1,
        http_tls_cert=server_certificate.cert,
        http_tls_key=server_certificate.key,
        trusted_proxies="10.0.0.0/8,192.0.2.1",
    )
    options = gunicorn_options(settings)
    config = Config()
    for name, value in options.items():  # gunicorn's own validation of each
        config.set(name, value)
    assert config.bind == ["[::]:8443"] and config.workers == 3 and config.threads == 1
    assert config.worker_class_str == "sync" and config.preload_app
    assert config.certfile == str(server_certificate.cert)
    assert config.forwarded_allow_ips == ["10.0.0.0/8", "192.0.2.1/32"]
    assert config.wsgi_app == "lungnode.app.wsgi:app"
    plain = gunicorn_options(make_settings(api_threads=4))
    assert plain["worker_class"] == "gthread" and "certfile" not in plain
    assert plain["forwarded_allow_ips"] == ""  # gunicorn's default would trust 127.0.0.1


def test_multiprocess_metrics_need_the_folder_before_prometheus_is_imported(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    # This process imported prometheus-client without the variable: too late for it.
    with pytest.raises(ConfigError, match=ENV):
        use_metrics_dir(make_settings(metrics_dir=tmp_path), processes=2, empty=True)
    assert ENV not in os.environ
    with pytest.raises(RuntimeError, match=ENV):
        Metrics(multiprocess_dir=tmp_path)
    assert use_metrics_dir(make_settings(), processes=1, empty=True) is None
