"""What the API may ask of the node it runs in: settings, database, model, paths."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from lungnode.config import Settings
from lungnode.db.session import write_transaction

if TYPE_CHECKING:  # the model bundle loads TensorFlow: only ever imported lazily
    from lungnode.api.cache import AnswerCache
    from lungnode.api.metrics import Metrics
    from lungnode.dicom.intake import Intake
    from lungnode.ml.bundle import ModelBundle


class NodeStatus(Protocol):
    """Live state of the in-process node (absent when the API runs alone)."""

    @property
    def scp_listening(self) -> bool: ...


class ModelSource(Protocol):
    """The node's model bundle, loaded and warmed at its start (``pipeline.warmup``)."""

    def bundle(self, timeout: float | None = None) -> ModelBundle:
        """The bundle, once warmed; raises ``BundleError`` when it failed or timed out."""
        ...

    def status(self) -> dict[str, Any]:
        """``state`` (warming, ready, failed), and ``error`` when failed."""
        ...


#: Hands the ids of a batch's pending items to the workers (``queue = "celery"``:
#: ``lungnode.app`` publishes them on the broker). Without one, the API runs a
#: batch itself, in the request.
BatchQueue = Callable[[list[int]], None]


class AssociationLog(Protocol):
    """Where the senders of instances are recorded (``dicom.scp.AssociationLog``)."""

    def association_started(self, calling_ae: str, peer_address: str | None) -> int: ...

    def association_ended(self, association_id: int, outcome: str) -> None: ...


@dataclass(frozen=True)
class Receiving:
    """The node's receiving side, for STOW-RS (``lungnode.api.stow``): the very intake
    C-STORE stores through, the association log, and what to tell when a sender is done
    (the completion timer's wake, in the embedded node). ``lungnode.app`` builds it."""

    intake: Intake
    associations: AssociationLog
    on_association_ended: Callable[[], None] = lambda: None


def _extension() -> dict[str, Any]:
    return cast(dict[str, Any], current_app.extensions["lungnode"])


def settings() -> Settings:
    return cast(Settings, _extension()["settings"])


def engine() -> Engine:
    return cast(Engine, _extension()["engine"])


def sessions() -> sessionmaker[Session]:
    return cast(sessionmaker[Session], _extension()["sessions"])


def reading() -> Session:
    """A session for reads only (on SQLite: a plain BEGIN, no write lock). Use ``with``."""
    return cast(sessionmaker[Session], _extension()["read_sessions"])()


@contextmanager
def writing() -> Iterator[Session]:
    """A write transaction, committed on success; writers of one engine take turns."""
    with write_transaction(sessions()) as session:
        yield session


def node_status() -> NodeStatus | None:
    return cast("NodeStatus | None", _extension()["node_status"])


def metrics() -> Metrics:
    return cast("Metrics", _extension()["metrics"])


def answer_cache() -> AnswerCache:
    return cast("AnswerCache", _extension()["cache"])


def uploads_dir() -> Path:
    return settings().storage_dir / "uploads"


def heatmaps_dir() -> Path:
    return settings().storage_dir / "heatmaps"


def reports_dir() -> Path:
    return settings().storage_dir / "reports"


def stored_path(path: Path) -> str:
    """``path`` as a row keeps it: relative to ``storage_dir`` (``config.stored_path``)."""
    return settings().stored_path(path)


def stored_file(stored: str) -> Path:
    """The absolute file a row's path names (``config.resolve_stored``)."""
    return settings().resolve_stored(stored)


def batch_queue() -> BatchQueue | None:
    return cast("BatchQueue | None", _extension().get("batch_queue"))


def receiving() -> Receiving | None:
    return cast("Receiving | None", _extension().get("receiving"))


def model_source() -> ModelSource | None:
    return cast("ModelSource | None", _extension().get("model"))


def model_loaded() -> bool:
    """The API alone: whether a prediction has loaded the bundle yet."""
    return _extension().get("bundle") is not None


#: How long a prediction waits for the node's model to finish warming.
MODEL_WAIT_SECONDS = 60.0

_bundle_lock = threading.Lock()


def model_bundle() -> ModelBundle:
    """The node's warmed bundle (waiting while it warms), or the configured bundle,
    loaded (with TensorFlow) on first use when the API runs without a node.

    Raises ``BundleError`` when the bundle is missing, does not verify, failed
    to warm, or is still warming after ``MODEL_WAIT_SECONDS``.
    """
    extension = _extension()
    source = model_source()
    if source is not None:
        return source.bundle(MODEL_WAIT_SECONDS)
    bundle = extension.get("bundle")
    if bundle is None:
        with _bundle_lock:
            bundle = extension.get("bundle")
            if bundle is None:
                from lungnode.ml.bundle import load_bundle

                config = settings()
                bundle = load_bundle(
                    config.model, config.models_dir, trust_pickle=config.trust_pickle
                )
                extension["bundle"] = bundle
    return cast("ModelBundle", bundle)
