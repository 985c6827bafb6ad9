"""The job rows: queued -> running -> done | failed, each transition one short
guarded transaction.

The job row is the truth; a queue or a broker message only carries its id. A
worker claims a job with a conditional update, so two workers never run one
job, whichever process they are in. The series completion queues the job
(:meth:`lungnode.db.repo.NodeRepository.complete_series`), in the transaction
that completes the series; a Celery worker's lease on a running attempt is
:mod:`lungnode.db.leases`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from lungnode.db.models import Job, JobState
from lungnode.db.session import read_sessions, write_transaction


def _now() -> datetime:
    return datetime.now(UTC)


def due_job(now: datetime) -> ColumnElement[bool]:
    """A queued job whose back-off, if any, is over."""
    return and_(
        Job.state == JobState.QUEUED.value,
        or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
    )


#: A failed job queued again by an admin: due now, attempts counted afresh.
REQUEUE_FAILED_JOB: dict[str, Any] = {
    "state": JobState.QUEUED.value,
    "attempts": 0,
    "next_attempt_at": None,
    "reason": None,
    "finished_at": None,
    "lease_until": None,
}


class JobRepository:
    """The job rows, for the local worker pool, the Celery workers and the CLI.

    Every method opens its own session: the workers call it concurrently.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._reads = read_sessions(sessions)

    def queued_job_ids(self) -> list[int]:
        with self._reads() as session:
            return list(
                session.scalars(
                    select(Job.id).where(Job.state == JobState.QUEUED.value).order_by(Job.id)
                )
            )

    def due_job_ids(self, now: datetime | None = None) -> list[int]:
        """Queued jobs whose back-off, if any, is over, oldest first."""
        with self._reads() as session:
            return list(
                session.scalars(select(Job.id).where(due_job(now or _now())).order_by(Job.id))
            )

    def claim_job(self, job_id: int) -> int | None:
        """queued and due -> running, for exactly one worker.

        Returns the number of this attempt, or None when the job is not due or
        another worker has it.
        """
        claimed = self._claim(Job.id == job_id)
        return None if claimed is None else claimed[1]

    def _claim(self, *criteria: ColumnElement[bool]) -> tuple[int, int] | None:
        """The guarded transition queued and due -> running, on the matching job.

        On PostgreSQL the row is picked with ``SELECT ... FOR UPDATE SKIP LOCKED``:
        a job another worker is claiming is passed over at once, not waited for.
        SQLite has no row locks (the statement carries no FOR UPDATE there); its
        writers are serialised by BEGIN IMMEDIATE. The UPDATE repeats the guard
        either way, so a job is claimed by one worker whatever the isolation.
        """
        with write_transaction(self.sessions) as session:
            now = _now()
            job_id = session.scalar(
                select(Job.id)
                .where(due_job(now), *criteria)
                .order_by(Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if job_id is None:
                return None
            attempt = session.scalar(
                update(Job)
                .where(Job.id == job_id, due_job(now))
                .values(
                    state=JobState.RUNNING.value,
                    started_at=now,
                    attempts=Job.attempts + 1,
                    next_attempt_at=None,
                )
                .returning(Job.attempts)
            )
            return None if attempt is None else (job_id, attempt)

    def finish_job(
        self,
        job_id: int,
        state: JobState,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """running -> done | failed. A job its handler already finished is left alone."""
        with write_transaction(self.sessions) as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.RUNNING.value:
                return
            job.state = state.value
            job.reason = reason
            job.finished_at = _now()
            if details is not None:
                job.details = details
            if error is not None:
                job.last_error = error

    def retry_job_later(self, job_id: int, error: str, delay_seconds: float) -> None:
        """running -> queued after a failed attempt, due once the back-off is over."""
        self._requeue(job_id, error, delay_seconds, count_attempt=True)

    def wait_for_storage(self, job_id: int, error: str, delay_seconds: float) -> None:
        """running -> queued after an attempt that found the storage full, due again in
        ``delay_seconds``. The attempt is not counted: a full disk is no fault of the
        series nor of the job, and must never use up its attempts."""
        self._requeue(job_id, error, delay_seconds, count_attempt=False)

    def _requeue(
        self, job_id: int, error: str, delay_seconds: float, *, count_attempt: bool
    ) -> None:
        values: dict[str, Any] = {
            "state": JobState.QUEUED.value,
            "last_error": error,
            "next_attempt_at": _now() + timedelta(seconds=delay_seconds),
            "lease_until": None,
        }
        if not count_attempt:
            values["attempts"] = Job.attempts - 1
        with write_transaction(self.sessions) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
                .values(**values)
            )

    def retry_failed_jobs(self, job_ids: list[int] | None = None) -> list[int]:
        """failed -> queued (all, or these ids), due now, attempts counted afresh."""
        with write_transaction(self.sessions) as session:
            statement = select(Job.id).where(Job.state == JobState.FAILED.value)
            if job_ids is not None:
                statement = statement.where(Job.id.in_(job_ids))
            ids = list(session.scalars(statement.order_by(Job.id)))
            if ids:
                session.execute(update(Job).where(Job.id.in_(ids)).values(**REQUEUE_FAILED_JOB))
            return ids

    def jobs(self, state: JobState | None = None) -> list[Job]:
        """Jobs (all, or in one state), oldest first."""
        with self._reads() as session:
            statement = select(Job).order_by(Job.id)
            if state is not None:
                statement = statement.where(Job.state == state.value)
            return list(session.scalars(statement))

    def requeue_job(self, job_id: int) -> bool:
        """running -> queued, for a job a stopping node gives up; False if it finished.

        The attempt given up did not fail, so it is not counted against the job."""
        with write_transaction(self.sessions) as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
                .values(state=JobState.QUEUED.value, attempts=Job.attempts - 1)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def requeue_interrupted_jobs(self) -> list[int]:
        """At start: a job left running by a crash is queued again, due now."""
        with write_transaction(self.sessions) as session:
            ids = list(session.scalars(select(Job.id).where(Job.state == JobState.RUNNING.value)))
            if ids:
                session.execute(
                    update(Job).where(Job.id.in_(ids)).values(state=JobState.QUEUED.value)
                )
            return ids
