"""What ``lungnode beat`` does each tick in the scaled mode: keeps the rows moving.

The database rows are the truth; broker messages only carry ids, and a message
can be lost (a broker restarted without persistence, a publish during an
outage, a worker killed before it took the message). Beat therefore looks at
the rows, not at the broker:

- :class:`JobSweeper` gives up the attempts of lost workers (their lease ran
  out: ``db.leases``) and sends a message for every due queued job that no
  message seems to carry: one back from a back-off, or waiting longer than
  ``resend_seconds`` since it was last sent.
- :class:`DeliveryScheduler` sends a message for each destination's due
  deliveries, so a worker sends them (``Outbox.deliver``, with its retries,
  back-off and dead letters) after claiming them (``DeliveryRepository.claim``).
- :class:`BatchItemSweeper` does for the items of ``/batch-predict`` what the
  job sweeper does for jobs: gives up attempts whose lease ran out, and sends
  again the pending items no worker has taken for ``resend_seconds``.

A message too many is harmless: the job claim and the delivery claim are
guarded transitions, so a second message finds nothing to do. A message too
few only delays, until the next re-send.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Hashable
from datetime import UTC, datetime, timedelta

from lungnode.db.batches import BatchItems
from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.leases import JobLeases, QueuedJob
from lungnode.pipeline.batches import ItemTerms, give_up_lost_item
from lungnode.pipeline.jobs import JobRetryPolicy

logger = logging.getLogger(__name__)

#: Sends "run job N" to the workers; raises when the broker does not take it.
PublishJob = Callable[[int], None]
#: Sends "send these deliveries to this destination" to the workers.
PublishDeliveries = Callable[[str, list[int]], None]
#: Sends "predict batch item N", one message per id.
PublishBatchItems = Callable[[list[int]], None]


def _now() -> datetime:
    return datetime.now(UTC)


def give_up_lost_attempt(
    leases: JobLeases, job_id: int, attempt: int, policy: JobRetryPolicy, why: str
) -> bool:
    """End an attempt whose worker died: the job is queued again after the usual
    back-off, or failed after the last attempt. It counts as a failed attempt: a
    series that kills its worker every time (out of memory) must end ``failed``.
    Returns False when the attempt had ended meanwhile (left alone)."""
    error = f"worker lost: {why}"
    if attempt >= policy.max_attempts:
        released = leases.release(
            job_id,
            attempt,
            error,
            None,
            reason=f"gave up after {attempt} attempt(s); last error: {error}",
        )
        if released:
            logger.error("job %d failed for good: %s", job_id, error)
        return released
    delay = policy.delay(attempt)
    released = leases.release(job_id, attempt, error, delay)
    if released:
        logger.warning(
            "job %d attempt %d: %s; queued again, due in %.1f s", job_id, attempt, error, delay
        )
    return released


class _Sent:
    """When beat last sent a message for each key; forgets keys no longer due."""

    def __init__(self) -> None:
        self._at: dict[Hashable, datetime] = {}

    def get(self, key: Hashable) -> datetime | None:
        return self._at.get(key)

    def mark(self, key: Hashable, moment: datetime) -> None:
        self._at[key] = moment

    def keep_only(self, keys: set[Hashable]) -> None:
        for key in set(self._at) - keys:
            del self._at[key]


class JobSweeper:
    def __init__(
        self,
        leases: JobLeases,
        publish: PublishJob,
        policy: JobRetryPolicy,
        *,
        lease_seconds: float,
        resend_seconds: float,
        backlog: Callable[[], int | None] = lambda: None,
    ) -> None:
        """``backlog`` answers how many messages wait in the jobs queue (None:
        unknown). While at least as many wait as there are due jobs, a job waiting
        long is taken to be carried, and is not sent again: a long queue then
        does not fill up with copies."""
        self.leases = leases
        self.publish = publish
        self.policy = policy
        self.lease_seconds = lease_seconds
        self.resend_seconds = resend_seconds
        self.backlog = backlog
        self._sent = _Sent()

    def sweep(self, now: datetime | None = None) -> list[int]:
        """One pass: lost attempts given up, then uncarried jobs sent. Returns the ids sent."""
        moment = now or _now()
        unleased_before = moment - timedelta(seconds=self.lease_seconds)
        for lost in self.leases.lost_jobs(unleased_before, moment):
            give_up_lost_attempt(
                self.leases,
                lost.id,
                lost.attempts,
                self.policy,
                f"no lease renewal for {self.lease_seconds:g} s",
            )
        queued = self.leases.queued_jobs(moment)
        # One key per attempt: a job back from a back-off is a new thing to send.
        self._sent.keep_only({(job.id, job.attempts) for job in queued})
        resend_before = moment - timedelta(seconds=self.resend_seconds)
        first: list[QueuedJob] = []  # back from a back-off: nobody else sends these
        again: list[QueuedJob] = []  # sent (by the scp, or by us) long ago, still queued
        for job in queued:
            sent = self._sent.get((job.id, job.attempts))
            if sent is None and job.next_attempt_at is not None:
                first.append(job)
            elif (sent or job.queued_since) < resend_before:
                again.append(job)
        if again:
            waiting = self.backlog()
            if waiting is not None and waiting >= len(queued):
                again = []
        published = []
        for job in first + again:
            self.publish(job.id)
            self._sent.mark((job.id, job.attempts), moment)
            published.append(job.id)
        if again:
            logger.info(
                "sent %d queued job(s) again that no worker had taken: %s",
                len(again),
                [job.id for job in again],
            )
        return published


class DeliveryScheduler:
    def __init__(
        self, deliveries: DeliveryRepository, publish: PublishDeliveries, *, resend_seconds: float
    ) -> None:
        self.deliveries = deliveries
        self.publish = publish
        self.resend_seconds = resend_seconds
        self._sent = _Sent()

    def schedule(self, now: datetime | None = None) -> dict[str, list[int]]:
        """Send one message per destination with its due deliveries not sent lately."""
        moment = now or _now()
        due = self.deliveries.due(moment)
        # One key per attempt: a delivery due again after a failed attempt is sent at once.
        self._sent.keep_only({(d.id, d.attempts) for d in due})
        resend_before = moment - timedelta(seconds=self.resend_seconds)
        by_destination: dict[str, list[int]] = defaultdict(list)
        for delivery in due:
            sent = self._sent.get((delivery.id, delivery.attempts))
            if sent is None or sent < resend_before:
                by_destination[delivery.destination].append(delivery.id)
        attempts = {d.id: d.attempts for d in due}
        for destination, ids in by_destination.items():
            self.publish(destination, ids)
            for delivery_id in ids:
                self._sent.mark((delivery_id, attempts[delivery_id]), moment)
        return dict(by_destination)


class BatchItemSweeper:
    def __init__(
        self,
        items: BatchItems,
        publish: PublishBatchItems,
        terms: ItemTerms,
        *,
        resend_seconds: float,
    ) -> None:
        self.items = items
        self.publish = publish
        self.terms = terms
        self.resend_seconds = resend_seconds
        self._sent = _Sent()

    def sweep(self, now: datetime | None = None) -> list[int]:
        """One pass: lost attempts given up and sent at once, then pending items
        waiting longer than ``resend_seconds`` (since they became pending, or since
        beat last sent them) sent again. Returns the ids sent."""
        moment = now or _now()
        # Released here: no message carries them (their worker took it down with it).
        released = {
            item_id
            for item_id, attempt in self.items.lost(moment)
            if give_up_lost_item(self.items, item_id, attempt, self.terms, "its lease ran out")
        }
        waiting = self.items.waiting()
        self._sent.keep_only({(item.id, item.attempts) for item in waiting})
        resend_before = moment - timedelta(seconds=self.resend_seconds)
        due = [
            item
            for item in waiting
            if item.id in released
            or (self._sent.get((item.id, item.attempts)) or item.since) < resend_before
        ]
        if due:
            ids = [item.id for item in due]
            self.publish(ids)
            for item in due:
                self._sent.mark((item.id, item.attempts), moment)
            logger.info("sent %d pending batch item(s) that no worker had taken: %s", len(ids), ids)
        return [item.id for item in due]
