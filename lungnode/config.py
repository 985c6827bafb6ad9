"""One Settings object: defaults < ``config/lungnode.toml`` < ``LUNGNODE_*`` environment.

Every setting is documented once, here, with its environment name and default;
the README's settings table and ``config/lungnode.toml`` repeat the same facts.
The TOML file is found at ``$LUNGNODE_CONFIG`` or ``config/lungnode.toml`` under
the working directory; a missing file is not an error.

``storage_dir`` and ``models_dir`` are made absolute against the working
directory when the settings load, once: a relative path handed on would be
resolved later against whatever the callee takes as its base (Flask's
``send_file`` takes the package folder). The database keeps paths of stored
files relative to ``storage_dir`` (:func:`stored_path`) and they are resolved
at use (:func:`resolve_stored`), so a shared volume mounted at another path on
another host finds the same files.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lungnode.errors import ConfigError
from lungnode.peers import DicomwebPeer, Peer, validate_ae_title

logger = logging.getLogger(__name__)

DEFAULT_SECRET = "change-me"
DEFAULT_CONFIG_FILE = Path("config/lungnode.toml")


def _split_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return [str(part).strip() for part in value if str(part).strip()]
    raise ValueError(f"expected a comma-separated string or a list, got {value!r}")


def stored_path(path: Path, storage_dir: Path) -> str:
    """How the database keeps the path of a file: relative to ``storage_dir``, in POSIX
    form. A file outside the storage keeps its absolute path (it cannot move with it)."""
    absolute = Path(path).absolute()
    root = storage_dir.absolute()
    if absolute.is_relative_to(root):
        return absolute.relative_to(root).as_posix()
    resolved = absolute.resolve()
    if resolved.is_relative_to(root.resolve()):
        return resolved.relative_to(root.resolve()).as_posix()
    return str(absolute)


def resolve_stored(stored: str, storage_dir: Path) -> Path:
    """The file a path kept in the database names: relative paths are under
    ``storage_dir``; absolute ones (rows written before paths were kept relative)
    stay as they are."""
    path = Path(stored)
    return path if path.is_absolute() else storage_dir / path


class Settings(BaseSettings):
    """The node's effective configuration."""

    model_config = SettingsConfigDict(
        env_prefix="LUNGNODE_", extra="forbid", validate_default=True, frozen=True
    )

    # -- general ---------------------------------------------------------------
    env: Literal["development", "production", "testing"] = "development"
    log_level: str = "INFO"
    storage_dir: Path = Path("storage")
    #: SQLAlchemy URL; empty means SQLite at ``<storage_dir>/lungnode.db``. A bare
    #: ``postgresql://`` URL is given the psycopg 3 driver (``postgresql+psycopg://``).
    database_url: str = ""
    #: Connections a process keeps open to a server database (PostgreSQL), and how many
    #: more it may open at a peak; SQLite ignores both. Sized per role (docs/configuration.md).
    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)

    # -- DICOM -----------------------------------------------------------------
    ae_title: str = "LUNGNODE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(default=11112, ge=0, lt=65536)
    peers: Annotated[list[Peer], NoDecode] = Field(default_factory=list)
    #: DICOMweb origin servers that may receive results by STOW-RS (PS3.18 10.5),
    #: ``NAME=BASE_URL[;option=value...]`` (``peers.DicomwebPeer``).
    dicomweb_peers: Annotated[list[DicomwebPeer], NoDecode] = Field(default_factory=list)
    #: Peer names (DIMSE or DICOMweb) that receive results; empty means the peer
    #: that sent the series.
    result_destinations: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allow_unknown_callers: bool = False
    #: Associations received at once (all receiving processes together); beyond it
    #: an association is rejected as transient. About 0.1 MiB each while idle
    #: (docs/configuration.md).
    max_associations: int = Field(default=32, ge=1)
    #: Processes that receive DICOM: the node and ingest_processes - 1 workers;
    #: 0 means one per CPU core available to the node.
    ingest_processes: int = Field(default=0, ge=0, le=64)
    max_pdu_size: int = Field(default=4_194_304, ge=0)
    #: Who serves associations that only store images and echo: "lean" (one thread
    #: per association, reading the socket itself, ``dicom.lean_store``) or
    #: "pynetdicom". Anything else always goes to pynetdicom.
    store_receiver: Literal["lean", "pynetdicom"] = "lean"
    #: Seconds of silence after which an association is aborted.
    network_timeout: float = Field(default=60.0, gt=0)
    #: Refuse new instances (status 0xA700) when less than this much disk is free.
    min_free_disk_mb: int = Field(default=500, ge=0)
    #: Megabytes of the instances received last that each receiving process leaves
    #: in the page cache; older ones are dropped from it (``dicom.page_cache``).
    intake_page_cache_mb: int = Field(default=64, ge=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA bundle to verify client certificates; when set, clients must present one.
    tls_ca: Path | None = None

    # -- series completeness ---------------------------------------------------
    series_quiet_seconds: float = Field(default=15.0, gt=0)
    series_grace_seconds: float = Field(default=2.0, ge=0)
    series_check_interval: float = Field(default=0.5, gt=0)
    #: The one relative tolerance on slice spacing (``imaging.geometry.slice_stack``):
    #: a stack is even when every step lies within it of the median step.
    series_spacing_tolerance: float = Field(default=0.1, gt=0, lt=1)

    # -- HTTP API --------------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=5000, ge=0, lt=65536)
    secret_key: SecretStr = SecretStr(DEFAULT_SECRET)
    admin_password: SecretStr | None = None
    #: Origins allowed to call the API from a browser (CORS); empty: none.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    access_token_minutes: int = Field(default=15, ge=1)
    refresh_token_hours: int = Field(default=168, ge=1)
    #: Flask-Limiter limits ("N/period", several separated by ";").
    rate_limit_default: str = "300/minute"
    rate_limit_login: str = "10/minute"
    #: DICOMweb reads (QIDO-RS, WADO-RS), per client address.
    rate_limit_dicomweb: str = "3000/minute"
    #: Flask-Limiter storage; empty: in memory, or broker_url when queue is celery with Redis.
    rate_limit_storage_uri: str = ""
    #: TLS for the API itself (``serve`` and the ``api`` role); both or neither.
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    #: Addresses or networks of reverse proxies whose X-Forwarded-* headers are honoured.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: In production, plain HTTP beyond loopback is refused unless this is set.
    allow_plain_http: bool = False
    #: The ``api`` role under gunicorn: worker processes, and threads per worker.
    api_workers: int = Field(default=2, ge=1, le=64)
    api_threads: int = Field(default=4, ge=1, le=64)
    #: prometheus-client's multiprocess folder; unset: a fresh temporary folder when
    #: the ``api`` role runs several workers, none (one process) otherwise.
    metrics_dir: Path | None = None
    #: Redis for the API's cache; empty: the rate limiter's Redis if it has one, else in process.
    cache_url: str = ""
    #: How long ``/stats`` answers are kept (a written prediction invalidates them); 0: never.
    stats_cache_seconds: float = Field(default=30.0, ge=0)
    max_upload_mb: int = Field(default=10, ge=1)
    max_batch_size: int = Field(default=10, ge=1)
    #: Largest STOW-RS request (a whole study in one body), MB; larger answers 413.
    dicomweb_max_request_mb: int = Field(default=2048, ge=1)
    #: Uploads no prediction refers to are removed by ``lungnode cleanup`` after this long.
    upload_retention_hours: float = Field(default=24.0, gt=0)

    # -- analysis and queue ----------------------------------------------------
    queue: Literal["local", "celery"] = "local"
    broker_url: str = "redis://127.0.0.1:6379/0"
    workers: int = Field(default=1, ge=0)
    model: str = "lung-ct-demo"
    models_dir: Path = Path("models")
    trust_pickle: bool = False
    #: Score each slice of a receiving series as it arrives (``pipeline.prescore``),
    #: so that a completed series needs only its key slices decoded. Embedded node only.
    prescore_slices: bool = True
    #: While a series waits out its grace (``series_grace_seconds``), analyse and render
    #: it, so that only writing and sending are left when the grace ends. Embedded node only.
    prepare_during_grace: bool = True
    #: The SR's storage class: Comprehensive 3D SR (IHE AIR), or Comprehensive SR
    #: for viewers that read only that.
    sr_storage: Literal["comprehensive-3d", "comprehensive"] = "comprehensive-3d"
    #: A series with fewer slices is answered "not analysed" instead of classified.
    min_series_slices: int = Field(default=5, ge=1)
    #: Attempts of a job that fails on a fault of the node (not of the series), then ``failed``.
    job_max_attempts: int = Field(default=3, ge=1)
    #: Back-off after the n-th failed attempt of a job: base * 2^(n-1), capped.
    job_retry_base_seconds: float = Field(default=30.0, gt=0)
    job_retry_cap_seconds: float = Field(default=600.0, gt=0)
    #: A job that found the storage full waits this long, then tries again (uncounted).
    job_storage_wait_seconds: float = Field(default=30.0, gt=0)
    #: Seconds between looks for queued jobs that are due (a new job also wakes the pool).
    job_check_interval: float = Field(default=1.0, gt=0)
    #: Seconds a stop waits for running jobs; a job still running then is queued again.
    stop_timeout_seconds: float = Field(default=8.0, ge=0)

    # -- scaled roles (queue = "celery") ------------------------------------------
    #: Job processes of one ``lungnode worker`` (each loads the model once).
    worker_concurrency: int = Field(default=1, ge=1)
    #: Hard limit of one job attempt on a Celery worker: the attempt is killed past it.
    job_time_limit_seconds: float = Field(default=1800.0, gt=0)
    #: A running job whose worker has not renewed its lease for this long is lost.
    job_lease_seconds: float = Field(default=60.0, gt=0)
    #: ``lungnode beat`` sends a queued job or due delivery again once no worker took
    #: it for this long (a message lost with a broker, or never sent during an outage).
    queue_resend_seconds: float = Field(default=60.0, gt=0)
    #: Redis: an unacknowledged message goes back to the queue after this long.
    broker_visibility_timeout_seconds: float = Field(default=7200.0, gt=0)

    # -- result delivery (the outbox) -------------------------------------------
    #: Back-off after the n-th failed attempt: base * 2^(n-1), capped, with jitter.
    delivery_retry_base_seconds: float = Field(default=2.0, gt=0)
    delivery_retry_cap_seconds: float = Field(default=300.0, gt=0)
    #: Transient failures after which a delivery is dead-lettered.
    delivery_max_attempts: int = Field(default=12, ge=1)
    delivery_timeout: float = Field(default=30.0, gt=0)
    delivery_check_interval: float = Field(default=1.0, gt=0)
    #: Peer names asked for Storage Commitment (PS3.4 Annex J) after each delivery;
    #: their deliveries end ``committed`` once the peer reports it. Empty: none.
    commit_peers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Seconds after a commitment request without a report, after which it is retried.
    commit_report_timeout: float = Field(default=600.0, gt=0)
    #: Seconds the requesting association stays open for a report on it.
    commit_report_wait: float = Field(default=1.0, ge=0)

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("storage_dir", "models_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Once, at load: against the working directory the node was started in.
        return value.expanduser().resolve()

    @field_validator("http_tls_cert", "http_tls_key", "metrics_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # LUNGNODE_METRICS_DIR="" means unset, not the working directory.
        return None if value == "" else value

    @field_validator("http_tls_cert", "http_tls_key", "metrics_dir")
    @classmethod
    def _absolute_if_set(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_networks(cls, value: Any) -> list[str]:
        # Each an address or a network (CIDR); kept as text, normalised.
        return [str(ipaddress.ip_network(text, strict=False)) for text in _split_list(value)]

    @field_validator("cache_url")
    @classmethod
    def _check_cache_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "memory://")):
            raise ValueError(f"cache_url {value!r}: expected redis://, rediss:// or memory://")
        return value

    @field_validator("peers", mode="before")
    @classmethod
    def _parse_peers(cls, value: Any) -> list[Peer]:
        if isinstance(value, list) and all(isinstance(p, Peer) for p in value):
            return value
        return [Peer.parse(text) for text in _split_list(value)]

    @field_validator("dicomweb_peers", mode="before")
    @classmethod
    def _parse_dicomweb_peers(cls, value: Any) -> list[DicomwebPeer]:
        # A TOML array may hold tables ({name, url, options}) as well as strings.
        items = value if isinstance(value, list | tuple) else _split_list(value)
        return [
            item
            if isinstance(item, DicomwebPeer)
            else DicomwebPeer.from_mapping(item)
            if isinstance(item, dict)
            else DicomwebPeer.parse(str(item))
            for item in items
            if not isinstance(item, str) or item.strip()
        ]

    @field_validator("result_destinations", "commit_peers", "cors_origins", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> list[str]:
        return _split_list(value)

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        names = [p.name for p in self.peers]
        web_names = [p.name for p in self.dicomweb_peers]
        everyone = names + web_names
        duplicates = {n for n in everyone if everyone.count(n) > 1}
        if duplicates:
            raise ValueError(f"duplicate peer names: {sorted(duplicates)}")
        unknown = [d for d in self.result_destinations if d not in everyone]
        if unknown:
            raise ValueError(f"result destinations {unknown} are not among the peers {everyone}")
        web = [d for d in self.commit_peers if d in web_names]
        if web:
            raise ValueError(
                f"commit peers {web} are DICOMweb peers: Storage Commitment (PS3.4 Annex J) "
                "is a DIMSE service; a STOW-RS response already reports what was stored"
            )
        unknown = [d for d in self.commit_peers if d not in names]
        if unknown:
            raise ValueError(f"commit peers {unknown} are not among the peers {names}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("http_tls_cert and http_tls_key must be set together")
        if self.broker_visibility_timeout_seconds <= self.job_time_limit_seconds:
            # Redis would hand a job still running to a second worker.
            raise ValueError(
                "broker_visibility_timeout_seconds must be longer than job_time_limit_seconds"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("LUNGNODE_CONFIG", DEFAULT_CONFIG_FILE))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )

    # -- derived values --------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.storage_dir / 'lungnode.db').resolve()}"

    def stored_path(self, path: Path) -> str:
        """``path`` as the database keeps it: relative to ``storage_dir`` (see the module)."""
        return stored_path(path, self.storage_dir)

    def resolve_stored(self, stored: str) -> Path:
        """The file a path kept in the database names, under this node's ``storage_dir``."""
        return resolve_stored(stored, self.storage_dir)

    @property
    def effective_ingest_processes(self) -> int:
        """``ingest_processes``, with 0 resolved to the cores available, at most one
        per association allowed. Worker processes need Linux (connections are handed
        over on a SOCK_SEQPACKET Unix socket); elsewhere the node receives alone."""
        if not sys.platform.startswith("linux"):
            return 1
        wanted = self.ingest_processes or len(os.sched_getaffinity(0))
        return max(1, min(wanted, self.max_associations))

    @property
    def incoming_dir(self) -> Path:
        return self.storage_dir / "incoming"

    def peer_by_ae(self, ae_title: str) -> Peer | None:
        """The first peer with this AE title (AE titles compare without padding)."""
        wanted = ae_title.strip()
        return next((p for p in self.peers if p.ae_title == wanted), None)

    def check_safe_to_start(self) -> None:
        """Refuse unsafe settings. In production, a missing or default secret is fatal."""
        if self.env == "production":
            secret = self.secret_key.get_secret_value()
            if not secret or secret == DEFAULT_SECRET or len(secret) < 16:
                raise ConfigError(
                    "LUNGNODE_SECRET_KEY is missing, the default, or shorter than 16 "
                    "characters; refusing to start in production"
                )
            for peer in self.dicomweb_peers:
                if peer.secret is not None and peer.plain_http and not is_loopback(peer.host):
                    raise ConfigError(
                        f"DICOMweb peer {peer.name} would send its credentials over plain "
                        "HTTP; use an https:// base URL; refusing to start in production"
                    )

    def check_safe_to_serve_http(self) -> None:
        """Refuse to serve the API unsafely: TLS files that cannot be read, and in
        production, plain HTTP beyond loopback unless ``allow_plain_http`` says so
        (a TLS proxy on another host). Called by the roles that serve HTTP."""
        for name in ("http_tls_cert", "http_tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"LUNGNODE_{name.upper()}: {path} is not a readable file")
        if (
            self.env == "production"
            and self.http_tls_cert is None
            and not self.allow_plain_http
            and not is_loopback(self.http_host)
        ):
            raise ConfigError(
                f"the API would serve plain HTTP on {self.http_host} in production; set "
                "LUNGNODE_HTTP_TLS_CERT and LUNGNODE_HTTP_TLS_KEY, or bind LUNGNODE_HTTP_HOST "
                "to 127.0.0.1 behind a TLS proxy, or set LUNGNODE_ALLOW_PLAIN_HTTP=true when "
                "a proxy on another host terminates TLS"
            )

    def masked(self) -> dict[str, str]:
        """Every setting as text, secrets masked, for the start-up log."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = "(unset)" if not value.get_secret_value() else "********"
            elif value is None:
                text = "(unset)"
            elif isinstance(value, list):
                text = ",".join(str(v) for v in value) or "(none)"
            else:
                text = str(value)
            shown[name] = text
        shown["database_url"] = _mask_url_password(self.effective_database_url)
        shown["broker_url"] = _mask_url_password(self.broker_url)
        shown["rate_limit_storage_uri"] = _mask_url_password(self.rate_limit_storage_uri)
        shown["cache_url"] = _mask_url_password(self.cache_url)
        return shown


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _mask_url_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]+@", r"\1********@", url)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one readable :class:`ConfigError`."""
    try:
        return Settings(**overrides)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise ConfigError(f"invalid settings: {exc}") from exc
