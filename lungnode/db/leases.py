"""Jobs on Celery workers (the scaled roles): leases on running jobs, and what
``lungnode beat`` reads to keep every queued job carried by a broker message.

A job row is the truth; a broker message only says "look at job N". In the
embedded node a job left ``running`` by a crash is queued again at the next
start. Celery workers start and die on their own, on other machines, so a
running attempt holds a *lease* instead: the worker renews ``lease_until``
while it works, and once the lease has run out the worker is taken for lost
and the attempt is given up (queued again, or failed after the last attempt).
Every transition is guarded by the attempt number, so a job that another
worker has claimed since is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from lungnode.db.jobs import due_job
from lungnode.db.models import Job, JobState
from lungnode.db.session import read_sessions, write_transaction


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class QueuedJob:
    id: int
    attempts: int
    created_at: datetime
    #: Set when the job waits out a back-off (or was queued again after a lost worker).
    next_attempt_at: datetime | None

    @property
    def queued_since(self) -> datetime:
        return self.next_attempt_at or self.created_at


@dataclass(frozen=True)
class RunningJob:
    id: int
    attempts: int


def _lost(now: datetime, unleased_before: datetime) -> ColumnElement[bool]:
    """A running job's lease ran out, or it never took one in time."""
    return or_(
        Job.lease_until < now,
        and_(Job.lease_until.is_(None), Job.started_at < unleased_before),
    )


def _running_attempt(job_id: int, attempt: int) -> ColumnElement[bool]:
    return and_(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.attempts == attempt)


class JobLeases:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._reads = read_sessions(sessions)

    def queued_jobs(self, now: datetime | None = None) -> list[QueuedJob]:
        """The due queued jobs, oldest first, with what ``lungnode beat`` needs to
        decide whether a broker message still carries each."""
        with self._reads() as session:
            rows = session.execute(
                select(Job.id, Job.attempts, Job.created_at, Job.next_attempt_at)
                .where(due_job(now or _now()))
                .order_by(Job.id)
            ).all()
        return [
            QueuedJob(row.id, row.attempts, row.created_at, row.next_attempt_at) for row in rows
        ]

    def renew(self, job_id: int, attempt: int, seconds: float) -> bool:
        """Hold this running attempt ``seconds`` longer. False once it is no longer
        ours: finished, or queued again because the lease had run out."""
        with write_transaction(self.sessions) as session:
            result = session.execute(
                update(Job)
                .where(_running_attempt(job_id, attempt))
                .values(lease_until=_now() + timedelta(seconds=seconds))
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def lost_jobs(self, unleased_before: datetime, now: datetime | None = None) -> list[RunningJob]:
        """Running jobs whose worker is gone: the lease ran out, or the attempt
        started before ``unleased_before`` and never took one (its worker died at once)."""
        with self._reads() as session:
            rows = session.execute(
                select(Job.id, Job.attempts)
                .where(Job.state == JobState.RUNNING.value, _lost(now or _now(), unleased_before))
                .order_by(Job.id)
            ).all()
        return [RunningJob(row.id, row.attempts) for row in rows]

    def running_attempt(self, job_id: int) -> int | None:
        """The attempt a running job is in; None when it is not running."""
        with self._reads() as session:
            return session.scalar(
                select(Job.attempts).where(Job.id == job_id, Job.state == JobState.RUNNING.value)
            )

    def release(
        self, job_id: int, attempt: int, error: str, retry_in: float | None, reason: str = ""
    ) -> bool:
        """running -> queued (due in ``retry_in`` seconds) or, with ``retry_in`` None,
        -> failed with ``reason``: an attempt whose worker died. Guarded by the
        attempt, so a job that another worker has claimed since is left alone."""
        now = _now()
        values: dict[str, Any] = {"last_error": error, "lease_until": None}
        if retry_in is None:
            values.update(state=JobState.FAILED.value, reason=reason, finished_at=now)
        else:
            values.update(
                state=JobState.QUEUED.value, next_attempt_at=now + timedelta(seconds=retry_in)
            )
        with write_transaction(self.sessions) as session:
            result = session.execute(
                update(Job).where(_running_attempt(job_id, attempt)).values(**values)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]
