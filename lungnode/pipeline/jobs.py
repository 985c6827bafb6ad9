"""The job state machine and the local worker pool (embedded mode).

queued -> running -> done | failed. The queue carries only job ids; the job
row is the truth. Workers claim a job with a conditional update, so two
workers never run one job, and a job left ``running`` by a crash is queued
again at start (:meth:`JobRepository.requeue_interrupted_jobs`).

A handler that raises has failed this *attempt*, not the series: a bug or a
resource fault (disk full, out of memory) says nothing about the images, so
nothing is sent and the job goes back to ``queued``, due after an exponential
back-off. After ``max_attempts`` it is ``failed`` with the reason, until an
admin retries it. What the series itself cannot give (too few slices, pixels
that cannot be decoded) is not an exception here: the handler answers it
with a "not analysed" result and the job is ``done``.

A full storage (``errors.storage_full``: a write's ENOSPC or EDQUOT, a database
that cannot grow) is neither: the job *waits*. It goes back to ``queued`` with
``last_error`` "storage full: ...", due again every ``storage_wait_seconds``, and
the attempt is not counted, so however long the disk stays full the job is never
``failed`` for it; it runs again by itself once there is room. The handler has
written and recorded nothing of such an attempt (its outputs are all or none).

What a job *does* is the :data:`JobHandler` seam: the analysis, the writers
and the outbox plug in there. With no handler, jobs wait in ``queued``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lungnode.config import Settings
from lungnode.db.jobs import JobRepository
from lungnode.db.leases import JobLeases
from lungnode.db.models import JobState
from lungnode.errors import JobNotRunning, storage_full

logger = logging.getLogger(__name__)

#: Runs one claimed job; returns details to record (timings, model), raises on failure.
JobHandler = Callable[[int], "dict[str, Any] | None"]


@dataclass(frozen=True)
class JobRetryPolicy:
    max_attempts: int = 3
    base_seconds: float = 30.0
    cap_seconds: float = 600.0
    #: A job that found the storage full tries again after this many seconds.
    storage_wait_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> JobRetryPolicy:
        return cls(
            max_attempts=settings.job_max_attempts,
            base_seconds=settings.job_retry_base_seconds,
            cap_seconds=settings.job_retry_cap_seconds,
            storage_wait_seconds=settings.job_storage_wait_seconds,
        )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th failure: base·2^(attempt-1), capped.

        No jitter: the pool runs a few jobs at a time, so retries cannot stampede.
        """
        return float(min(self.cap_seconds, self.base_seconds * 2.0 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class LeaseTerms:
    """How a Celery worker holds a running job (``db.leases``): renewed every third
    of ``seconds``; a job not renewed for ``seconds`` is taken for lost."""

    leases: JobLeases
    seconds: float


class _Heartbeat:
    """Renews the lease of one running attempt on a daemon thread until stopped."""

    def __init__(self, terms: LeaseTerms, job_id: int, attempt: int) -> None:
        self.terms = terms
        self.job_id = job_id
        self.attempt = attempt
        self._stop = threading.Event()
        # The first renewal before the handler starts: the lease exists from the claim on.
        self._renew()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)
        self._thread.start()

    def _renew(self) -> bool:
        try:
            if self.terms.leases.renew(self.job_id, self.attempt, self.terms.seconds):
                return True
            logger.warning("job %d: lease lost; another attempt may run it", self.job_id)
            return False
        except Exception:
            logger.exception("job %d: renewing the lease failed; will try again", self.job_id)
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.terms.seconds / 3):
            if not self._renew():
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_job(
    repo: JobRepository,
    handler: JobHandler,
    job_id: int,
    policy: JobRetryPolicy | None = None,
    lease: LeaseTerms | None = None,
    stopping: threading.Event | None = None,
) -> bool:
    """Claim and run one attempt of a due job. Returns False when it was not ours to run.

    With ``lease`` (Celery workers), the attempt holds a lease while it runs.
    ``stopping`` ends the wait of a job that cannot even record that it waits for
    space (its database is on the full disk): it stays ``running``, for the next start.
    """
    policy = policy or JobRetryPolicy()
    attempt = repo.claim_job(job_id)
    if attempt is None:
        return False
    logger.info("job %d running (attempt %d of %d)", job_id, attempt, policy.max_attempts)
    heartbeat = _Heartbeat(lease, job_id, attempt) if lease is not None else None
    try:
        _run_attempt(repo, handler, job_id, attempt, policy, stopping)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    return True


def _run_attempt(
    repo: JobRepository,
    handler: JobHandler,
    job_id: int,
    attempt: int,
    policy: JobRetryPolicy,
    stopping: threading.Event | None = None,
) -> None:
    try:
        details = handler(job_id)
    except JobNotRunning:
        # A stop gave this attempt up and queued the job again (or, on a Celery
        # worker, its lease ran out): no longer ours, and nothing was recorded.
        logger.info("job %d was given up while it ran; another attempt runs it", job_id)
    except Exception as exc:
        if storage_full(exc):
            _wait_for_storage(repo, job_id, exc, policy, stopping)
            return
        error = f"{type(exc).__name__}: {exc}"
        if attempt >= policy.max_attempts:
            logger.exception("job %d failed for good after %d attempt(s)", job_id, attempt)
            repo.finish_job(
                job_id,
                JobState.FAILED,
                f"gave up after {attempt} attempt(s); last error: {error}",
                error=error,
            )
        else:
            delay = policy.delay(attempt)
            logger.exception(
                "job %d attempt %d failed; nothing was sent, retry in %.1f s",
                job_id,
                attempt,
                delay,
            )
            repo.retry_job_later(job_id, error, delay)
    else:
        repo.finish_job(job_id, JobState.DONE, details=details)
        logger.info("job %d done", job_id)


def _wait_for_storage(
    repo: JobRepository,
    job_id: int,
    exc: Exception,
    policy: JobRetryPolicy,
    stopping: threading.Event | None,
) -> None:
    """running -> queued, due in ``storage_wait_seconds``, the attempt not counted.

    When the database shares the full disk, even that cannot be recorded: the
    worker tries again every ``storage_wait_seconds`` until it can, or until
    ``stopping`` is set (the job then stays ``running``: the next start queues it).
    """
    reason = str(exc) if str(exc).startswith("storage full") else f"storage full: {exc}"
    delay = policy.storage_wait_seconds
    logger.warning(
        "job %d waits for storage space, tries again in %g s (not counted as an attempt; "
        "nothing recorded or sent): %s",
        job_id,
        delay,
        reason,
    )
    while True:
        try:
            repo.wait_for_storage(job_id, reason, delay)
            return
        except Exception as again:
            if not storage_full(again) or stopping is None:
                raise
            logger.warning(
                "job %d: cannot record its wait either (the database is on the full "
                "storage); trying again in %g s",
                job_id,
                delay,
            )
        if stopping.wait(delay):
            return


class LocalJobQueue:
    """A pool of worker threads fed with due job ids by a scheduler thread.

    The scheduler looks for due jobs every ``interval`` seconds, and at once when
    a job is submitted or an attempt ends, so a job whose back-off is over runs
    again without a restart, and one queued by another process (``lungnode jobs
    retry``) is picked up within ``interval``.
    """

    def __init__(
        self,
        repo: JobRepository,
        handler: JobHandler | None,
        workers: int = 1,
        policy: JobRetryPolicy | None = None,
        *,
        interval: float = 1.0,
    ) -> None:
        self.repo = repo
        self.handler = handler
        self.workers = workers
        self.policy = policy or JobRetryPolicy()
        self.interval = interval
        self._ids: queue.Queue[int | None] = queue.Queue()
        #: Ids handed to the workers and not finished yet: never handed twice.
        self._handed: set[int] = set()
        self._handed_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._scheduler: threading.Thread | None = None
        #: The job each worker thread runs now, by thread name (for a bounded stop).
        self._running: dict[str, int] = {}

    def submit(self, job_id: int) -> None:
        """A job was queued: look for due jobs now (the row, not the id, is what runs)."""
        self._wake.set()

    def start(self) -> None:
        """Re-queue interrupted jobs, start the workers and the scheduler that feeds them."""
        requeued = self.repo.requeue_interrupted_jobs()
        if requeued:
            logger.info("re-queued %d job(s) interrupted by a stop: %s", len(requeued), requeued)
        if self.handler is None or self.workers == 0:
            logger.info("no job handler or workers: jobs stay queued")
            return
        self._stopping.clear()
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"job-worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._scheduler = threading.Thread(target=self._schedule, name="job-scheduler", daemon=True)
        self._scheduler.start()

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Let running jobs finish for at most ``timeout`` seconds; queued ones stay queued.

        A job still running then is given up: its row goes back to ``queued`` for
        the next start. It has recorded nothing, since a job records its results
        and deliveries in one transaction, which refuses a job no longer
        ``running`` (``db.results.record_job_results``). Returns the ids given up;
        their threads are daemons, left to end with the process.
        """
        self._stopping.set()
        self._wake.set()
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)
            self._scheduler = None
        while True:  # what waits in the queue stays queued in the database
            try:
                self._ids.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._ids.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        given_up = [
            job_id
            for thread in self._threads
            if thread.is_alive() and (job_id := self._running.get(thread.name)) is not None
        ]
        for job_id in given_up:
            try:
                requeued = self.repo.requeue_job(job_id)
            except Exception:  # a full disk under the database: the next start does it
                logger.exception("job %d: cannot queue it again; the next start does", job_id)
                continue
            if requeued:
                logger.warning(
                    "job %d still running when the stop's time ran out: "
                    "left queued for the next start",
                    job_id,
                )
        self._threads.clear()
        return given_up

    def feed_due(self) -> int:
        """Hand every due job not yet handed to the workers. Returns how many."""
        fed = 0
        for job_id in self.repo.due_job_ids():
            with self._handed_lock:
                if job_id in self._handed:
                    continue
                self._handed.add(job_id)
            self._ids.put(job_id)
            fed += 1
        return fed

    def _schedule(self) -> None:
        while not self._stopping.is_set():
            try:
                self.feed_due()
            except Exception:
                logger.exception("looking for due jobs failed; will look again")
            self._wake.wait(self.interval)
            self._wake.clear()

    def _work(self) -> None:
        assert self.handler is not None
        while True:
            job_id = self._ids.get()
            if job_id is None or self._stopping.is_set():
                return
            name = threading.current_thread().name
            self._running[name] = job_id
            try:
                if not self._stopping.is_set():  # left queued for the next start
                    run_job(self.repo, self.handler, job_id, self.policy, stopping=self._stopping)
            except Exception as exc:
                if storage_full(exc):  # the claim itself could not be recorded
                    logger.warning("job %d waits: the database cannot record: %s", job_id, exc)
                else:
                    logger.exception("worker error on job %d", job_id)
            finally:
                self._running.pop(name, None)
                with self._handed_lock:
                    self._handed.discard(job_id)
                self._wake.set()
