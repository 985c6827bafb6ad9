"""The job state machine on a real database: failed attempts are retried after a
back-off, then ``failed``; the local pool re-runs a job once its back-off is over;
a job that finds the storage full waits, however long, without using up attempts."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from lungnode.db.jobs import JobRepository
from lungnode.db.migrate import upgrade
from lungnode.db.models import Job, Series
from lungnode.db.session import make_engine, make_session_factory
from lungnode.errors import StorageFull
from lungnode.pipeline.jobs import JobRetryPolicy, LocalJobQueue, run_job
from tests.conftest import Databases
from tests.dicom.helpers import wait_until

FAST = JobRetryPolicy(max_attempts=3, base_seconds=0.2, cap_seconds=0.3)


@pytest.fixture
def repo(databases: Databases) -> Iterator[JobRepository]:
    url = databases.fresh()
    upgrade(url)
    engine = make_engine(url)
    yield JobRepository(make_session_factory(engine))
    engine.dispose()


def _queue_job(repo: JobRepository) -> int:
    with repo.sessions.begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid=f"1.2.{time.time_ns()}")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id)
        session.add(job)
        session.flush()
        return job.id


def _job(repo: JobRepository, job_id: int) -> Job:
    with repo.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _failing(times: int, exc: Exception) -> tuple[Callable[[int], dict[str, Any]], list[float]]:
    """A handler that raises ``exc`` the first ``times`` calls; the moments of every call."""
    calls: list[float] = []

    def handler(job_id: int) -> dict[str, Any]:
        calls.append(time.monotonic())
        if len(calls) <= times:
            raise exc
        return {"ok": True}

    return handler, calls


def test_backoff_doubles_and_is_capped() -> None:
    policy = JobRetryPolicy(max_attempts=5, base_seconds=30, cap_seconds=100)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [30, 60, 100, 100]


def test_a_failed_attempt_requeues_the_job_after_a_backoff(repo: JobRepository) -> None:
    job_id = _queue_job(repo)
    handler, _ = _failing(1, OSError(errno.EIO, "Input/output error"))
    before = datetime.now(UTC)
    assert run_job(repo, handler, job_id, FAST)
    job = _job(repo, job_id)
    assert (job.state, job.attempts, job.reason) == ("queued", 1, None)
    assert job.last_error == "OSError: [Errno 5] Input/output error"
    assert job.next_attempt_at is not None
    assert (
        before + timedelta(seconds=0.2)
        <= job.next_attempt_at
        <= datetime.now(UTC) + (timedelta(seconds=0.2))
    )
    # Not due yet: no worker may claim it, and the scheduler does not see it.
    assert repo.due_job_ids() == [] and not run_job(repo, handler, job_id, FAST)
    assert repo.due_job_ids(job.next_attempt_at) == [job_id]
    time.sleep(0.25)
    assert run_job(repo, handler, job_id, FAST)
    job = _job(repo, job_id)
    assert (job.state, job.attempts, job.next_attempt_at) == ("done", 2, None)
    assert job.details == {"ok": True} and job.last_error is not None  # kept as history


def test_after_max_attempts_the_job_is_failed_with_the_reason(repo: JobRepository) -> None:
    job_id = _queue_job(repo)
    handler, calls = _failing(99, ValueError("operands could not be broadcast together"))
    for _ in range(3):
        with repo.sessions.begin() as session:  # skip the wait: make it due now
            session.execute(update(Job).where(Job.id == job_id).values(next_attempt_at=None))
        assert run_job(repo, handler, job_id, FAST)
    job = _job(repo, job_id)
    assert (job.state, job.attempts, len(calls)) == ("failed", 3, 3)
    assert job.last_error == "ValueError: operands could not be broadcast together"
    assert job.reason == f"gave up after 3 attempt(s); last error: {job.last_error}"
    assert repo.due_job_ids() == [] and not run_job(repo, handler, job_id, FAST)
    # An admin runs it again: queued, due now, attempts counted afresh.
    assert repo.retry_failed_jobs([job_id, 999]) == [job_id]
    job = _job(repo, job_id)
    assert (job.state, job.attempts, job.reason, job.next_attempt_at) == ("queued", 0, None, None)
    assert repo.retry_failed_jobs() == []


def test_an_interrupted_job_is_requeued_due_now(repo: JobRepository) -> None:
    job_id = _queue_job(repo)
    assert repo.claim_job(job_id) == 1 and repo.claim_job(job_id) is None
    assert repo.requeue_interrupted_jobs() == [job_id]
    assert repo.due_job_ids() == [job_id] and repo.claim_job(job_id) == 2


def test_the_local_pool_reruns_a_job_once_its_backoff_is_over(repo: JobRepository) -> None:
    """Before, a failed job stayed failed: the pool never looked at it again."""
    job_id = _queue_job(repo)
    handler, calls = _failing(2, MemoryError())
    pool = LocalJobQueue(repo, handler, workers=2, policy=FAST, interval=0.05)
    pool.start()
    try:
        pool.submit(job_id)
        assert wait_until(lambda: _job(repo, job_id).state == "done", timeout=10)
    finally:
        pool.stop()
    job = _job(repo, job_id)
    assert job.attempts == 3 and len(calls) == 3 and job.last_error == "MemoryError: "
    # Each retry waited out its back-off: 0.2 s, then 0.3 s (capped).
    gaps = [later - earlier for earlier, later in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.3, gaps


def test_the_pool_gives_up_and_runs_one_job_on_one_worker(repo: JobRepository) -> None:
    job_id = _queue_job(repo)
    running = threading.Semaphore(1)
    overlaps: list[int] = []

    def handler(job_id: int) -> dict[str, Any]:
        if not running.acquire(blocking=False):
            overlaps.append(job_id)
        try:
            time.sleep(0.02)
            raise RuntimeError("model crashed")
        finally:
            running.release()

    pool = LocalJobQueue(repo, handler, workers=3, policy=FAST, interval=0.01)
    pool.start()
    try:
        assert wait_until(lambda: _job(repo, job_id).state == "failed", timeout=10)
    finally:
        pool.stop()
    job = _job(repo, job_id)
    assert job.attempts == 3 and overlaps == []
    assert job.reason is not None and "RuntimeError: model crashed" in job.reason


def test_an_attempt_a_stop_gives_up_is_not_counted(repo: JobRepository) -> None:
    """A stop that gives a running job up queues it again; that attempt did not fail,
    and the given-up thread's late results are refused (JobNotRunning), not a failure."""
    from lungnode.errors import JobNotRunning

    job_id = _queue_job(repo)

    def handler(job_id: int) -> dict[str, Any]:
        assert repo.requeue_job(job_id)  # the stop's time ran out meanwhile
        raise JobNotRunning(f"job {job_id} is queued, no longer running")

    assert run_job(repo, handler, job_id, FAST)
    job = _job(repo, job_id)
    assert (job.state, job.attempts, job.last_error) == ("queued", 0, None)


def _make_due(repo: JobRepository, job_id: int) -> None:
    with repo.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(next_attempt_at=None))


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        StorageFull("storage full: 0.0 MiB free, the results need 5.0 MiB"),
    ],
    ids=["enospc", "edquot", "storage-full"],
)
def test_a_full_storage_makes_the_job_wait_without_using_its_attempts(
    repo: JobRepository, exc: Exception
) -> None:
    """Before, a full disk was one more failed attempt: after ``job_max_attempts`` of
    them the job was ``failed``, and the series stayed unanalysed once space returned."""
    job_id = _queue_job(repo)
    policy = JobRetryPolicy(max_attempts=2, base_seconds=60, cap_seconds=60, storage_wait_seconds=5)
    handler, calls = _failing(5, exc)
    for _ in range(5):  # more than max_attempts
        before = datetime.now(UTC)
        assert run_job(repo, handler, job_id, policy)
        job = _job(repo, job_id)
        assert (job.state, job.attempts, job.reason) == ("queued", 0, None)
        assert job.last_error is not None and job.last_error.startswith("storage full: ")
        assert str(exc) in job.last_error
        # Due after storage_wait_seconds, not after the back-off (60 s).
        assert job.next_attempt_at is not None
        wait = job.next_attempt_at - before
        assert timedelta(seconds=5) <= wait <= timedelta(seconds=6), wait
        assert repo.due_job_ids() == []
        _make_due(repo, job_id)
    assert run_job(repo, handler, job_id, policy)
    job = _job(repo, job_id)
    assert (job.state, job.attempts, len(calls)) == ("done", 1, 6)


def test_a_storage_wait_does_not_hide_a_real_failure(repo: JobRepository) -> None:
    """Waits do not count, failures still do: two failures of max_attempts=2 fail it."""
    job_id = _queue_job(repo)
    policy = JobRetryPolicy(max_attempts=2, base_seconds=0.01, storage_wait_seconds=0.01)
    faults = [OSError(errno.ENOSPC, "full"), RuntimeError("bug"), OSError(errno.ENOSPC, "full")]
    faults.append(RuntimeError("bug"))

    def handler(job_id: int) -> dict[str, Any]:
        raise faults.pop(0)

    for _ in range(4):
        _make_due(repo, job_id)
        assert run_job(repo, handler, job_id, policy)
    job = _job(repo, job_id)
    assert (job.state, job.attempts) == ("failed", 2)
    assert job.reason == "gave up after 2 attempt(s); last error: RuntimeError: bug"


def test_the_local_pool_runs_a_waiting_job_again_by_itself(repo: JobRepository) -> None:
    job_id = _queue_job(repo)
    handler, calls = _failing(4, OSError(errno.ENOSPC, "No space left on device"))
    policy = JobRetryPolicy(max_attempts=1, base_seconds=60, storage_wait_seconds=0.1)
    pool = LocalJobQueue(repo, handler, workers=1, policy=policy, interval=0.05)
    pool.start()
    try:
        pool.submit(job_id)
        assert wait_until(lambda: _job(repo, job_id).state == "done", timeout=10)
    finally:
        pool.stop()
    job = _job(repo, job_id)
    assert (job.attempts, len(calls)) == (1, 5)
    gaps = [later - earlier for earlier, later in zip(calls, calls[1:], strict=False)]
    assert min(gaps) >= 0.1, gaps
