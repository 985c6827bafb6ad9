"""SQLAlchemy 2.0 typed models.

The original plan's tables (User, Prediction, BatchPrediction) and the node's
own: Association, Series, Instance, Job, Delivery and AuditEvent. Every arrow of
the data flow that crosses a process or a crash is a row here. No patient name,
ID or birth date is stored: those stay in the DICOM files.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

UID = String(64)  # PS3.5 9.1: a UID is at most 64 characters
#: The longest audit target; PostgreSQL enforces it, longer ones are cut (``repo.audit``).
AUDIT_TARGET_LENGTH = 200


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class Role(enum.StrEnum):
    ADMIN = "admin"
    RADIOLOGIST = "radiologist"
    VIEWER = "viewer"
    #: An archive or modality that sends studies by STOW-RS, and may do nothing else.
    SENDER = "sender"


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class BatchStatus(enum.StrEnum):
    """A batch of ``/batch-predict``: pending until a worker starts one of its items,
    running until every item has ended, then how its items ended."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    PARTIAL = "partial"
    FAILED = "failed"


class BatchItemState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(enum.StrEnum):
    """``done``: delivered to a destination without Storage Commitment. With it
    (PS3.4 Annex J), a delivered object is ``sent`` until the destination's report
    commits it (``committed``); a failure or no report in time makes it ``pending``
    again (or ``dead``)."""

    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"
    SENT = "sent"
    COMMITTED = "committed"


# -- the original plan's tables -------------------------------------------------


class User(Base):
    __tablename__ = "user"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    email: Mapped[str | None] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default=Role.VIEWER.value, index=True)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    predictions: Mapped[list[Prediction]] = relationship(back_populates="user")
    batches: Mapped[list[BatchPrediction]] = relationship(back_populates="user")


class BatchPrediction(Base):
    __tablename__ = "batch_prediction"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"), index=True)
    batch_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)

    user: Mapped[User | None] = relationship(back_populates="batches")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="batch")
    items: Mapped[list[BatchItem]] = relationship(
        back_populates="batch", order_by="BatchItem.position"
    )


class BatchItem(Base):
    """One image of a batch: the truth about it whichever process runs it.

    Created with the batch, ``pending`` (or ``failed`` at once when the upload was
    refused). A worker claims it (``running``, one more attempt, a lease), and the
    prediction row is written in the same transaction that marks it ``done``, guarded
    by the attempt: two workers never both record one item.
    """

    __tablename__ = "batch_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batch_prediction.id"), index=True)
    #: The item's place in the request, from 0.
    position: Mapped[int] = mapped_column(Integer)
    file_id: Mapped[str | None] = mapped_column(String(64))
    #: The stored upload (PNG, JPEG or DICOM), relative to ``storage_dir``.
    kind: Mapped[str | None] = mapped_column(String(8))
    image_path: Mapped[str | None] = mapped_column(Text)
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    state: Mapped[str] = mapped_column(String(16), default=BatchItemState.PENDING.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: A running item past this is taken for lost (its worker died).
    lease_until: Mapped[datetime | None] = mapped_column()
    prediction_id: Mapped[int | None] = mapped_column(
        ForeignKey("prediction.id", ondelete="SET NULL"), index=True
    )
    #: ``{code, message, details}`` of a failed item, as the API answers errors.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The last change of state: how long a pending item has waited for a worker.
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    batch: Mapped[BatchPrediction] = relationship(back_populates="items")

    __table_args__ = (UniqueConstraint("batch_id", "position", name="uq_batch_item_position"),)


class Prediction(Base):
    """One verdict: for an uploaded image, or for a DICOM series (then job_id is set).

    Paths are kept relative to ``storage_dir`` (``config.stored_path``); rows from
    before that hold absolute ones. The model's identity is recorded when the
    prediction is made, and every later output (report, history) reads it here,
    never from the bundle on disk, which may have changed since. Rows from before
    migration 0002 have ``model_synthetic`` NULL: identity not recorded.
    """

    __tablename__ = "prediction"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"), index=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batch_prediction.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id"), index=True)
    source: Mapped[str] = mapped_column(String(16), default="upload", index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    image_path: Mapped[str | None] = mapped_column(Text)
    prediction_class: Mapped[str | None] = mapped_column(String(64), index=True)
    confidence_score: Mapped[float | None] = mapped_column(Float)
    all_scores: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    report_path: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    #: True for a model trained on synthetic data; NULL: identity not recorded.
    model_synthetic: Mapped[bool | None] = mapped_column(Boolean)
    model_intended_use: Mapped[str | None] = mapped_column(Text)
    model_trained_on: Mapped[str | None] = mapped_column(Text)
    timestamp: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    processing_time: Mapped[float | None] = mapped_column(Float)

    user: Mapped[User | None] = relationship(back_populates="predictions")
    batch: Mapped[BatchPrediction | None] = relationship(back_populates="predictions")

    __table_args__ = (Index("ix_prediction_user_timestamp", "user_id", "timestamp"),)


# -- the node's own tables --------------------------------------------------------


class Association(Base):
    """A DICOM association that sent us instances; its release drives completion rule 2."""

    __tablename__ = "association"

    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16), index=True)
    peer_address: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    #: Set on release, abort, or at the next start for one a crash left open.
    ended_at: Mapped[datetime | None] = mapped_column(index=True)
    outcome: Mapped[str | None] = mapped_column(String(16))


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    #: The sending peer's AE title; results go back there by default.
    calling_ae: Mapped[str | None] = mapped_column(String(16), index=True)
    #: A declared total (ImagesInAcquisition) when the instances carry one.
    declared_count: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING.value, index=True)
    completion_rule: Mapped[str | None] = mapped_column(String(32))
    completion_reason: Mapped[str | None] = mapped_column(Text)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(index=True)

    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series", order_by="Job.version")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("association.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    #: ImagePositionPatient and ImageOrientationPatient, as lists of floats.
    position: Mapped[list[float] | None] = mapped_column(JSON)
    orientation: Mapped[list[float] | None] = mapped_column(JSON)
    #: Relative to ``storage_dir`` (absolute in rows written before that).
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One analysis of one version of a series. Only ids travel on the queue."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value, index=True)
    #: Why the job is ``failed``, for people.
    reason: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: A queued job is not claimed before this (back-off after a failed attempt); None: now.
    next_attempt_at: Mapped[datetime | None] = mapped_column(index=True)
    #: The error of the last failed attempt, kept when a later attempt succeeds.
    last_error: Mapped[str | None] = mapped_column(Text)
    #: A job running on a Celery worker: the worker renews this while it works; once
    #: it has passed, the worker is lost and ``lungnode beat`` queues the job again.
    lease_until: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column(index=True)
    #: Per-stage timings and the model identity, once run.
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    series: Mapped[Series] = relationship(back_populates="jobs")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job")

    __table_args__ = (UniqueConstraint("series_id", "version", name="uq_job_series_version"),)


class Delivery(Base):
    """One result object for one destination: the outbox."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    #: Relative to ``storage_dir`` (absolute in rows written before that).
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: The Storage Commitment transaction that last asked for this object (recorded
    #: before the N-ACTION goes out), and when a ``sent`` delivery's report is overdue.
    commit_transaction_uid: Mapped[str | None] = mapped_column(UID, index=True)
    commit_due_at: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    job: Mapped[Job] = relationship(back_populates="deliveries")

    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_delivery_destination_sop"),
    )


class AuditEvent(Base):
    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(String(AUDIT_TARGET_LENGTH))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
