"""The scaled mode's bookkeeping on a real database, without a broker: leases on
running jobs, what ``lungnode beat`` sends (and does not send again), and the
claim that makes a second message for the same deliveries harmless."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.jobs import JobRepository
from lungnode.db.leases import JobLeases
from lungnode.db.migrate import upgrade
from lungnode.db.models import Delivery, Job, Series
from lungnode.db.session import make_engine, make_session_factory
from lungnode.pipeline.jobs import JobRetryPolicy, LeaseTerms, run_job
from lungnode.pipeline.sweeper import DeliveryScheduler, JobSweeper, give_up_lost_attempt

POLICY = JobRetryPolicy(max_attempts=2, base_seconds=5, cap_seconds=5)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[JobRepository]:
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield JobRepository(make_session_factory(engine))
    engine.dispose()


@pytest.fixture
def leases(repo: JobRepository) -> JobLeases:
    return JobLeases(repo.sessions)


def _queue_job(repo: JobRepository, **values: Any) -> int:
    with repo.sessions.begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid=f"1.2.{time.time_ns()}")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, **values)
        session.add(job)
        session.flush()
        return job.id


def _job(repo: JobRepository, job_id: int) -> Job:
    with repo.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _set(repo: JobRepository, job_id: int, **values: Any) -> None:
    with repo.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_a_running_attempt_renews_its_lease_and_drops_it_when_done(
    repo: JobRepository, leases: JobLeases
) -> None:
    job_id = _queue_job(repo)
    seen: list[datetime | None] = []
    released = threading.Event()

    def handler(job_id: int) -> dict[str, Any]:
        first = _job(repo, job_id).lease_until
        time.sleep(0.5)  # more than a third of the lease: renewed meanwhile
        seen.extend([first, _job(repo, job_id).lease_until])
        released.set()
        return {}

    assert run_job(repo, handler, job_id, POLICY, LeaseTerms(leases, seconds=0.9))
    assert released.is_set()
    first, later = seen
    assert first is not None and later is not None and later > first
    assert _job(repo, job_id).state == "done"
    assert leases.lost_jobs(datetime.now(UTC)) == []


def test_an_expired_lease_is_a_lost_attempt_queued_again_then_failed(
    repo: JobRepository, leases: JobLeases
) -> None:
    job_id = _queue_job(repo)
    assert repo.claim_job(job_id) == 1
    assert leases.renew(job_id, 1, seconds=-1)  # a worker that stopped renewing
    published: list[int] = []
    sweeper = JobSweeper(leases, published.append, POLICY, lease_seconds=30, resend_seconds=60)
    sweeper.sweep()
    job = _job(repo, job_id)
    assert (job.state, job.attempts, job.lease_until) == ("queued", 1, None)
    assert job.last_error is not None and job.last_error.startswith("worker lost")
    assert job.next_attempt_at is not None
    # Back from its back-off, it is sent at once: no other process sends it.
    assert published == []
    sweeper.sweep(now=job.next_attempt_at + timedelta(seconds=1))
    assert published == [job_id]
    # The last attempt lost as well: failed, with the reason.
    assert (
        repo.claim_job(
            job_id,
        )
        is None
    )  # not due yet by the real clock
    _set(repo, job_id, next_attempt_at=None)
    assert repo.claim_job(job_id) == 2
    assert give_up_lost_attempt(leases, job_id, 2, POLICY, "killed")
    job = _job(repo, job_id)
    assert job.state == "failed" and job.reason is not None and "killed" in job.reason


def test_an_attempt_that_never_took_a_lease_is_lost_after_one_lease(
    repo: JobRepository, leases: JobLeases
) -> None:
    job_id = _queue_job(repo)
    assert repo.claim_job(job_id) == 1  # claimed, and the worker died before its heartbeat
    now = datetime.now(UTC)
    assert leases.lost_jobs(now - timedelta(seconds=30), now) == []
    assert [j.id for j in leases.lost_jobs(now + timedelta(seconds=1), now)] == [job_id]


def test_releasing_a_lost_attempt_leaves_a_later_claim_alone(
    repo: JobRepository, leases: JobLeases
) -> None:
    job_id = _queue_job(repo)
    repo.claim_job(job_id)
    assert leases.release(job_id, 1, "worker lost", retry_in=0)
    assert repo.claim_job(job_id) == 2
    # A late sweep that still had attempt 1 in mind changes nothing.
    assert not leases.release(job_id, 1, "worker lost", retry_in=0)
    assert not leases.renew(job_id, 1, 30)
    assert _job(repo, job_id).state == "running"


def test_beat_sends_a_fresh_job_again_only_once_nobody_took_it(
    repo: JobRepository, leases: JobLeases
) -> None:
    job_id = _queue_job(repo)
    created = _job(repo, job_id).created_at
    published: list[int] = []
    waiting: list[int | None] = [None]
    sweeper = JobSweeper(
        leases,
        published.append,
        POLICY,
        lease_seconds=30,
        resend_seconds=60,
        backlog=lambda: waiting[0],
    )
    # Fresh: the scp sent its message; beat leaves it to that.
    assert sweeper.sweep(now=created + timedelta(seconds=10)) == []
    # Still queued after resend_seconds: sent again, then not again for resend_seconds.
    assert sweeper.sweep(now=created + timedelta(seconds=61)) == [job_id]
    assert sweeper.sweep(now=created + timedelta(seconds=100)) == []
    assert sweeper.sweep(now=created + timedelta(seconds=122)) == [job_id]
    # While as many messages wait in the queue as jobs are due, none is sent again.
    waiting[0] = 1
    assert sweeper.sweep(now=created + timedelta(seconds=500)) == []
    waiting[0] = 0
    assert sweeper.sweep(now=created + timedelta(seconds=500)) == [job_id]
    assert published == [job_id] * 3


def _delivery(repo: JobRepository, job_id: int, uid: str, destination: str = "pacs") -> int:
    with repo.sessions.begin() as session:
        row = Delivery(
            job_id=job_id,
            destination=destination,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
            sop_instance_uid=uid,
            path=f"results/{uid}.dcm",
        )
        session.add(row)
        session.flush()
        return row.id


def test_delivery_messages_per_destination_and_a_second_message_finds_nothing(
    repo: JobRepository, tmp_path: Path
) -> None:
    job_id = _queue_job(repo)
    first = _delivery(repo, job_id, "1.2.3.1")
    second = _delivery(repo, job_id, "1.2.3.2")
    other = _delivery(repo, job_id, "1.2.3.3", destination="archive")
    deliveries = DeliveryRepository(repo.sessions, tmp_path / "storage")
    published: list[tuple[str, list[int]]] = []
    scheduler = DeliveryScheduler(
        deliveries, lambda d, ids: published.append((d, ids)), resend_seconds=60
    )
    assert scheduler.schedule() == {"pacs": [first, second], "archive": [other]}
    # Not sent again while a worker may still be on its way to them.
    assert scheduler.schedule() == {}
    claimed = deliveries.claim([first, second], lease_seconds_each=30)
    assert [d.id for d in claimed] == [first, second]
    assert claimed[0].path == str(tmp_path / "storage" / "results" / "1.2.3.1.dcm")
    # A duplicate message (a re-send, or a redelivery) finds them claimed.
    assert deliveries.claim([first, second], lease_seconds_each=30) == []
    # A failed attempt makes a delivery due again: it is sent at once, as a new attempt.
    deliveries.mark_retry(first, 0xA700, "out of resources", delay_seconds=0)
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert scheduler.schedule(now=later) == {"pacs": [first]}
