"""Settings: precedence, parsing, validation and the production guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungnode.config import load_settings
from lungnode.errors import ConfigError
from lungnode.peers import Peer


@pytest.fixture
def toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "lungnode.toml"
    monkeypatch.setenv("LUNGNODE_CONFIG", str(path))
    for name in ("LUNGNODE_AE_TITLE", "LUNGNODE_DICOM_PORT", "LUNGNODE_PEERS", "LUNGNODE_ENV"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_defaults(toml_file: Path) -> None:
    settings = load_settings()
    assert settings.ae_title == "LUNGNODE"
    assert settings.dicom_port == 11112
    assert settings.http_host == "127.0.0.1" and settings.http_port == 5000
    assert settings.series_quiet_seconds == 15 and settings.series_grace_seconds == 2
    assert settings.queue == "local" and not settings.allow_unknown_callers
    assert settings.effective_database_url.endswith("storage/lungnode.db")


def test_precedence_defaults_toml_environment(
    toml_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml_file.write_text(
        'ae_title = "FROMTOML"\ndicom_port = 2000\npeers = ["pacs=ORTHANC@127.0.0.1:4242"]\n'
    )
    settings = load_settings()
    assert (settings.ae_title, settings.dicom_port) == ("FROMTOML", 2000)
    assert settings.peers == [Peer("pacs", "ORTHANC", "127.0.0.1", 4242)]
    monkeypatch.setenv("LUNGNODE_DICOM_PORT", "3000")
    monkeypatch.setenv("LUNGNODE_PEERS", "a=AE1@h1:104, b=AE2@h2:105")
    settings = load_settings()
    assert (settings.ae_title, settings.dicom_port) == ("FROMTOML", 3000)
    assert [p.name for p in settings.peers] == ["a", "b"]


def test_shipped_toml_is_valid_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = Path(__file__).resolve().parents[2] / "config" / "lungnode.toml"
    monkeypatch.setenv("LUNGNODE_CONFIG", str(shipped))
    monkeypatch.delenv("LUNGNODE_PEERS", raising=False)
    assert load_settings().peers == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"peers": "pacs=ORTHANC@host"},  # no port
        {"peers": "pacs=WAY_TOO_LONG_AE_TITLE@host:104"},
        {"peers": "a=X@h:1,a=Y@h:2"},  # duplicate names
        {"peers": "a=X@h:1", "result_destinations": "b"},  # unknown destination
        {"ae_title": "BACK\\SLASH"},
        {"dicom_port": 70000},
        {"queue": "kafka"},
        {"tls_cert": "cert.pem"},  # without a key
        {"no_such_setting": 1},
    ],
)
def test_invalid_settings_are_refused_clearly(
    toml_file: Path, overrides: dict[str, object]
) -> None:
    with pytest.raises(ConfigError, match="invalid settings"):
        load_settings(**overrides)


def test_production_refuses_default_or_short_secret(toml_file: Path) -> None:
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load_settings(env="production").check_safe_to_start()
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load_settings(env="production", secret_key="short").check_safe_to_start()
    load_settings(env="production", secret_key="x" * 32).check_safe_to_start()
    load_settings(env="development").check_safe_to_start()  # development tolerates it


def test_masked_settings_hide_secrets(toml_file: Path) -> None:
    settings = load_settings(
        secret_key="s3cret-value-long-enough",
        admin_password="adminpass",
        database_url="postgresql+psycopg://lungnode:dbpass@db/lungnode",
        broker_url="redis://:brokerpass@redis:6379/0",
    )
    text = repr(settings.masked())
    for secret in ("s3cret-value-long-enough", "adminpass", "dbpass", "brokerpass"):
        assert secret not in text
    assert settings.masked()["ae_title"] == "LUNGNODE"


def test_celery_queue_is_accepted(toml_file: Path) -> None:
    settings = load_settings(queue="celery", broker_url="amqp://guest:guest@127.0.0.1:5672//")
    settings.check_safe_to_start()
    assert settings.queue == "celery"


def test_visibility_timeout_must_outlast_the_slowest_job(toml_file: Path) -> None:
    """Redis hands an unacknowledged message to another worker after the visibility
    timeout: shorter than a job's time limit, a running job would be sent twice."""
    with pytest.raises(ConfigError, match="broker_visibility_timeout_seconds"):
        load_settings(job_time_limit_seconds=600, broker_visibility_timeout_seconds=300)
    assert load_settings(job_time_limit_seconds=600).broker_visibility_timeout_seconds > 600


def test_ingest_processes_default_to_one_per_core(toml_file: Path) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    settings = load_settings()
    assert settings.ingest_processes == 0
    assert settings.effective_ingest_processes == min(cores, settings.max_associations)
    assert load_settings(ingest_processes=3).effective_ingest_processes == 3
    # Never more processes than associations they could run.
    capped = load_settings(ingest_processes=8, max_associations=2)
    assert capped.effective_ingest_processes == 2
    with pytest.raises(ConfigError):
        load_settings(ingest_processes=-1)


def test_storage_and_models_dirs_are_absolute_from_the_start(
    toml_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolved once, against the working directory the settings were loaded in."""
    root = tmp_path.resolve()
    monkeypatch.chdir(root)
    settings = load_settings()
    assert settings.storage_dir == root / "storage"
    assert settings.models_dir == root / "models"
    monkeypatch.chdir("/")
    assert settings.storage_dir == root / "storage"
    assert settings.effective_database_url == f"sqlite:///{root / 'storage' / 'lungnode.db'}"


def test_stored_paths_are_relative_to_the_storage(tmp_path: Path) -> None:
    settings = load_settings(storage_dir=tmp_path / "storage")
    inside = settings.storage_dir / "reports" / "1.2.3" / "4.5.6_v1.pdf"
    assert settings.stored_path(inside) == "reports/1.2.3/4.5.6_v1.pdf"
    assert settings.resolve_stored("reports/1.2.3/4.5.6_v1.pdf") == inside
    # Outside the storage a path cannot move with it: it stays absolute, as do old rows.
    outside = tmp_path / "elsewhere.dcm"
    assert settings.stored_path(outside) == str(outside)
    assert settings.resolve_stored(str(outside)) == outside
    moved = load_settings(storage_dir=tmp_path / "mounted")
    assert moved.resolve_stored(settings.stored_path(inside)) == (
        tmp_path / "mounted" / "reports" / "1.2.3" / "4.5.6_v1.pdf"
    )
