"""The job state machine and the local worker pool (embedded mode).

queued -> running -> done | failed. The queue carries only job ids; the job
row is the truth. Workers claim a job with a conditional update, so two
workers never run one job, and a job left ``running`` by a crash is queued
again at start (:meth:`NodeRepository.requeue_interrupted_jobs`).

What a job *does* is the :data:`JobHandler` seam: the analysis, the writers
and the outbox plug in there. With no handler, jobs wait in ``queued``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from lungnode.db.models import JobState
from lungnode.db.repo import NodeRepository

logger = logging.getLogger(__name__)

#: Runs one claimed job; returns details to record (timings, model), raises on failure.
JobHandler = Callable[[int], "dict[str, Any] | None"]


class JobFailed(Exception):
    """A handler's way to fail a job with a reason meant for people."""


def run_job(repo: NodeRepository, handler: JobHandler, job_id: int) -> bool:
    """Claim and run one job. Returns False when another worker had it."""
    if not repo.claim_job(job_id):
        return False
    logger.info("job %d running", job_id)
    try:
        details = handler(job_id)
    except JobFailed as exc:
        logger.warning("job %d failed: %s", job_id, exc)
        repo.finish_job(job_id, JobState.FAILED, str(exc))
    except Exception as exc:
        logger.exception("job %d failed unexpectedly", job_id)
        repo.finish_job(job_id, JobState.FAILED, f"internal error: {exc!r}")
    else:
        repo.finish_job(job_id, JobState.DONE, details=details)
        logger.info("job %d done", job_id)
    return True


class LocalJobQueue:
    """A pool of worker threads fed with job ids, backed by the job table."""

    def __init__(self, repo: NodeRepository, handler: JobHandler | None, workers: int = 1) -> None:
        self.repo = repo
        self.handler = handler
        self.workers = workers
        self._ids: queue.Queue[int | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        #: The job each worker thread runs now, by thread name (for a bounded stop).
        self._running: dict[str, int] = {}
        self._stopping = False

    def submit(self, job_id: int) -> None:
        if self.handler is not None and self.workers > 0:
            self._ids.put(job_id)

    def start(self) -> None:
        """Re-queue interrupted jobs, start the workers and feed them what is queued."""
        requeued = self.repo.requeue_interrupted_jobs()
        if requeued:
            logger.info("re-queued %d job(s) interrupted by a stop: %s", len(requeued), requeued)
        if self.handler is None or self.workers == 0:
            logger.info("no job handler or workers: jobs stay queued")
            return
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"job-worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        for job_id in self.repo.queued_job_ids():
            self._ids.put(job_id)

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Let running jobs finish for at most ``timeout`` seconds; queued ones stay queued.

        A job still running then is given up: its row goes back to ``queued`` for
        the next start. It has recorded nothing, since a job records its results
        and deliveries in one transaction, which refuses a job no longer
        ``running`` (``db.results.record_job_results``). Returns the ids given up;
        their threads are daemons, left to end with the process.
        """
        self._stopping = True
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
            if self.repo.requeue_job(job_id):
                logger.warning(
                    "job %d still running when the stop's time ran out: "
                    "left queued for the next start",
                    job_id,
                )
        self._threads.clear()
        return given_up

    def _work(self) -> None:
        assert self.handler is not None
        while True:
            job_id = self._ids.get()
            if job_id is None or self._stopping:
                return
            name = threading.current_thread().name
            self._running[name] = job_id
            try:
                run_job(self.repo, self.handler, job_id)
            except Exception:
                logger.exception("worker error on job %d", job_id)
            finally:
                self._running.pop(name, None)
