"""API fixtures: a migrated app on a temporary storage, users of each role, tokens,
a tiny Keras model bundle, pictures and DICOM images to upload."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from lungnode.api import create_app, ensure_first_admin
from lungnode.config import Settings
from lungnode.db.migrate import upgrade
from lungnode.db.models import Prediction, Role, User
from lungnode.db.session import make_engine, make_session_factory
from lungnode.passwords import hash_password
from tests.conftest import Databases, require_tool, unavailable

ADMIN_PASSWORD = "admin-password-for-tests"
PASSWORD = "password-for-tests"
#: The Redis database the API tests use; their keys hold a per-test part besides.
REDIS_TEST_DB = 9


@dataclass(frozen=True)
class ServerCertificate:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM)."""

    cert: Path
    key: Path


@pytest.fixture(scope="session")
def server_certificate(tmp_path_factory: pytest.TempPathFactory) -> ServerCertificate:
    openssl = require_tool("openssl")
    directory = tmp_path_factory.mktemp("https")
    cert, key = directory / "api.crt", directory / "api.key"
    result = subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-sha256",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return ServerCertificate(cert, key)


def require_redis() -> str:
    """The Redis on this machine (127.0.0.1:6379): missing fails under CI=true, skips elsewhere."""
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis is not reachable at {url}: {exc}")
    finally:
        client.close()
    return url


@pytest.fixture
def redis_url() -> str:
    return require_redis()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained Keras bundle: fast, and enough for the API's plumbing."""
    import keras

    from lungnode.domain import CLASS_LABELS
    from lungnode.ml.train import build_small_cnn, write_bundle

    keras.utils.set_random_seed(7)
    return write_bundle(
        build_small_cnn((32, 32), 2, 4),
        tmp_path_factory.mktemp("bundle") / "tiny",
        name="tiny",
        version="0.0.1",
        labels=CLASS_LABELS,
        input_size=(32, 32),
        windows=("lung", "mediastinal"),
        gradcam_layer="gradcam_conv",
        intended_use="API tests",
        synthetic=True,
        trained_on="nothing: random weights",
    )


@dataclass
class API:
    """A migrated app with one user of each role."""

    app: Flask
    settings: Settings
    client: FlaskClient
    users: dict[str, int]

    def token(self, role: str) -> str:
        username, password = ("admin", ADMIN_PASSWORD) if role == "admin" else (role, PASSWORD)
        response = self.client.post(
            "/api/v1/auth/login", json={"username": username, "password": password}
        )
        assert response.status_code == 200, response.json
        return str(response.json["access_token"])

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role)}"}

    def add_user(self, username: str, role: Role, active: bool = True) -> int:
        with self.app.extensions["lungnode"]["sessions"].begin() as session:
            user = User(
                username=username,
                role=role.value,
                active=active,
                password_hash=hash_password(PASSWORD),
            )
            session.add(user)
            session.flush()
            return user.id

    def add_predictions(self, count: int, **fields: Any) -> list[int]:
        """Rows without files, newest last: timestamps one minute apart."""
        start = fields.pop("start", datetime(2026, 1, 1, tzinfo=UTC))
        with self.app.extensions["lungnode"]["sessions"].begin() as session:
            rows = [
                Prediction(
                    **{
                        "source": "upload",
                        "prediction_class": "Normal",
                        "confidence_score": 0.9,
                        "all_scores": {"Normal": 0.9, "Adenocarcinoma": 0.1},
                        "model_name": "tiny",
                        "model_version": "0.0.1",
                        "timestamp": start + timedelta(minutes=i),
                        "processing_time": 0.1,
                        **fields,
                    }
                )
                for i in range(count)
            ]
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]


@pytest.fixture
def make_api(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[Callable[..., API]]:
    """Apps without a usable model unless ``model=`` names one (TensorFlow stays unloaded).

    ``batch_queue=`` is handed to ``create_app`` (the scaled API's queue for batch
    items); every other keyword is a setting.
    """
    engines = []

    def _make(batch_queue: Callable[[list[int]], None] | None = None, **overrides: Any) -> API:
        values: dict[str, Any] = {
            "model": "no-such-model",
            "storage_dir": tmp_path / f"storage{len(engines)}",
            "admin_password": ADMIN_PASSWORD,
            "rate_limit_default": "10000/minute",
            "rate_limit_login": "1000/minute",
        }
        values.update(overrides)
        settings = make_settings(**values)
        upgrade(settings.effective_database_url)
        engine = make_engine(settings.effective_database_url)
        engines.append(engine)
        assert ensure_first_admin(make_session_factory(engine), settings) is None
        app = create_app(settings, engine=engine, batch_queue=batch_queue)
        api = API(app, settings, app.test_client(), {})
        api.users["admin"] = 1
        for role in (Role.RADIOLOGIST, Role.VIEWER):
            api.users[role.value] = api.add_user(role.value, role)
        return api

    yield _make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def make_app(databases: Databases) -> Iterator[Callable[..., Flask]]:
    """``create_app`` whose engine is disposed after the test (an engine left to the
    garbage collector leaves its PostgreSQL connections open until then)."""
    apps: list[Flask] = []

    def _make(settings: Settings, **kwargs: Any) -> Flask:
        apps.append(create_app(settings, **kwargs))
        return apps[-1]

    yield _make
    for app in apps:
        app.extensions["lungnode"]["engine"].dispose()


@pytest.fixture
def api(make_api: Callable[..., API]) -> API:
    return make_api()


@pytest.fixture
def model_api(make_api: Callable[..., API], tiny_bundle: Path) -> API:
    return make_api(model=str(tiny_bundle))


def png_bytes(size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), 90, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def dicom_bytes(tmp_path: Path) -> bytes:
    from tests.support.synthetic import make_ct_series, write_series

    (path,) = write_series(make_ct_series(1, rows=64, columns=64), tmp_path / "dicom")
    return path.read_bytes()


def upload_form(content: bytes, filename: str = "image.png", field: str = "file") -> dict[str, Any]:
    return {field: (io.BytesIO(content), filename)}


def multipart(content: bytes, filename: str = "image.png") -> dict[str, Any]:
    """Test-client keywords for a multipart body built in memory.

    The test client spools large form bodies to a temporary file that it does
    not close when the server stops reading early (as on 413); a prepared
    body avoids that.
    """
    boundary = "lungnode-test-boundary"
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return {"data": body, "content_type": f"multipart/form-data; boundary={boundary}"}
