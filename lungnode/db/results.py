"""What a job reads before it runs, and what it records when it is done.

A finished job leaves, in ONE transaction: the job ``done`` with its details,
the Prediction row, and one Delivery per result object per destination. So a
crash either loses the whole result (the job is re-run at start) or none of it.

Paths come in and go out absolute; the rows keep them relative to
``storage_dir`` (``config.stored_path``), so the storage may be mounted
elsewhere. The prediction keeps the model's whole identity, which later
outputs read instead of the bundle on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lungnode.config import resolve_stored, stored_path
from lungnode.db.models import Delivery, Instance, Job, JobState, Prediction, Series
from lungnode.db.session import read_sessions, write_transaction
from lungnode.domain import ObjectRef, PreviousVersion
from lungnode.errors import JobNotRunning


@dataclass(frozen=True)
class JobInputs:
    job_id: int
    version: int
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str | None
    #: Absolute, in instance order.
    instance_paths: list[Path]
    #: The latest finished analysis of the same series, which this one supersedes.
    previous: PreviousVersion | None = None


@dataclass(frozen=True)
class ResultObject:
    """One written DICOM object waiting to be delivered."""

    kind: str  # "sc", "pm", "pdf", "sr" or "kos"
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # absolute


@dataclass
class JobResults:
    details: dict[str, Any]
    objects: list[ResultObject] = field(default_factory=list)
    prediction_class: str | None = None
    confidence: float | None = None
    all_scores: dict[str, float] | None = None
    #: Absolute paths; recorded relative to ``storage_dir``.
    heatmap_path: str | None = None
    report_path: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    model_synthetic: bool | None = None
    model_intended_use: str | None = None
    model_trained_on: str | None = None
    processing_time: float | None = None


def job_inputs(sessions: sessionmaker[Session], job_id: int, storage_dir: Path) -> JobInputs:
    with read_sessions(sessions)() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        return _inputs(session, job.id, job.series_id, job.version, storage_dir)


def next_job_inputs(
    sessions: sessionmaker[Session], series_id: int, storage_dir: Path
) -> JobInputs | None:
    """The inputs the job that completing series ``series_id`` now would queue will
    see (``NodeRepository.complete_series``), with ``job_id`` 0; None if there is no
    such series. What a series job prepares while a completion rule still waits."""
    with read_sessions(sessions)() as session:
        if session.get(Series, series_id) is None:
            return None
        version = (
            session.scalar(select(func.max(Job.version)).where(Job.series_id == series_id)) or 0
        ) + 1
        return _inputs(session, 0, series_id, version, storage_dir)


def _inputs(
    session: Session, job_id: int, series_id: int, version: int, storage_dir: Path
) -> JobInputs:
    series = session.get(Series, series_id)
    assert series is not None
    paths = [
        resolve_stored(stored, storage_dir)
        for stored in session.scalars(
            select(Instance.path)
            .where(Instance.series_id == series.id)
            .order_by(Instance.instance_number, Instance.id)
        )
    ]
    return JobInputs(
        job_id=job_id,
        version=version,
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        calling_ae=series.calling_ae,
        instance_paths=paths,
        previous=_previous_version(session, series_id, version),
    )


def _previous_version(session: Session, series_id: int, version: int) -> PreviousVersion | None:
    """The latest ``done`` job of the series below ``version``, as what it wrote.

    Its objects come from the job's details (``outputs``, recorded since results
    carry their predecessor); a job from before records none.
    """
    previous = session.scalars(
        select(Job)
        .where(
            Job.series_id == series_id,
            Job.version < version,
            Job.state == JobState.DONE.value,
        )
        .order_by(Job.version.desc())
        .limit(1)
    ).first()
    if previous is None:
        return None
    outputs = (previous.details or {}).get("outputs") or []
    objects = tuple(
        ObjectRef(
            kind=str(o["kind"]),
            sop_class_uid=str(o["sop_class_uid"]),
            series_instance_uid=str(o["series_instance_uid"]),
            sop_instance_uid=str(o["sop_instance_uid"]),
        )
        for o in outputs
        if isinstance(o, dict)
    )
    finished = previous.finished_at.isoformat(timespec="seconds") if previous.finished_at else None
    return PreviousVersion(version=previous.version, finished_at=finished, objects=objects)


def record_job_results(
    sessions: sessionmaker[Session],
    job_id: int,
    results: JobResults,
    destinations: list[str],
    storage_dir: Path,
) -> int:
    """Finish the job with its prediction and deliveries, atomically. Returns the prediction id.

    Only a ``running`` job is finished: ``JobNotRunning`` otherwise, with nothing recorded.

    A re-run (after a crash) replaces nothing already recorded: deliveries are
    unique per (destination, SOP Instance UID) and output UIDs are deterministic.
    """
    now = datetime.now(UTC)

    def stored(path: str | None) -> str | None:
        return stored_path(Path(path), storage_dir) if path else None

    with write_transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        if job.state != JobState.RUNNING.value:
            # A stop gave the job up (it is queued again) while it ran on: its
            # next run records the results, this one records nothing.
            raise JobNotRunning(f"job {job_id} is {job.state}, no longer running")
        series = session.get(Series, job.series_id)
        assert series is not None
        prediction = Prediction(
            job_id=job_id,
            source="dicom",
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            prediction_class=results.prediction_class,
            confidence_score=results.confidence,
            all_scores=results.all_scores,
            heatmap_path=stored(results.heatmap_path),
            report_path=stored(results.report_path),
            model_name=results.model_name,
            model_version=results.model_version,
            model_sha256=results.model_sha256,
            model_synthetic=results.model_synthetic,
            model_intended_use=results.model_intended_use,
            model_trained_on=results.model_trained_on,
            processing_time=results.processing_time,
            timestamp=now,
        )
        session.add(prediction)
        known = {
            (destination, uid)
            for destination, uid in session.execute(
                select(Delivery.destination, Delivery.sop_instance_uid).where(
                    Delivery.sop_instance_uid.in_([o.sop_instance_uid for o in results.objects])
                )
            )
        }
        for destination in destinations:
            for result in results.objects:
                if (destination, result.sop_instance_uid) in known:
                    continue
                session.add(
                    Delivery(
                        job_id=job_id,
                        destination=destination,
                        sop_class_uid=result.sop_class_uid,
                        sop_instance_uid=result.sop_instance_uid,
                        path=stored_path(Path(result.path), storage_dir),
                        next_attempt_at=now,
                        created_at=now,
                    )
                )
        job.state = JobState.DONE.value
        job.finished_at = now
        job.reason = None
        job.details = results.details
        session.flush()
        return prediction.id
