"""The ``beat`` role: the periodic work of the scaled mode, in one process.

Each tick it reads the rows and publishes messages (``pipeline.sweeper``):

- every ``job_check_interval``: attempts of lost workers are given up, and due
  queued jobs that no message carries are sent (again);
- every ``delivery_check_interval``: due deliveries are sent to the workers,
  one message per destination, and sent deliveries whose Storage Commitment
  failed or is overdue go back to the retry policy (``pipeline.commitment``);
- every ``job_check_interval``: attempts at ``/batch-predict`` items whose
  worker was lost are given up, and pending items no message carries are sent;
- hourly: the housekeeping of ``serve`` (``lungnode cleanup``).

Why a loop of its own and not ``celery beat``: celery beat only publishes a
"run the sweeper" message, and a worker runs it. The sweeper is what recovers
messages the broker lost; putting its own ticks on that broker, behind
analyses on workers that run one job at a time, would make it late exactly
when it is needed. This loop reads the database directly and needs no model.
Run one ``beat``: two would only send more duplicate messages (harmless).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lungnode.app.celery_app import CeleryPublisher, make_celery_app
from lungnode.app.housekeeping import Housekeeping
from lungnode.config import Settings
from lungnode.db.batches import BatchItems
from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.leases import JobLeases
from lungnode.db.migrate import upgrade
from lungnode.db.session import make_engine, make_session_factory
from lungnode.pipeline.batches import ItemTerms
from lungnode.pipeline.commitment import Commitments, CommitmentTerms
from lungnode.pipeline.jobs import JobRetryPolicy
from lungnode.pipeline.outbox import RetryPolicy
from lungnode.pipeline.sweeper import BatchItemSweeper, DeliveryScheduler, JobSweeper

logger = logging.getLogger(__name__)


class Beat:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.effective_database_url)
        self.sessions = make_session_factory(self.engine)
        self.publisher = CeleryPublisher(make_celery_app(settings))
        self.jobs = JobSweeper(
            JobLeases(self.sessions),
            self.publisher.job,
            JobRetryPolicy.from_settings(settings),
            lease_seconds=settings.job_lease_seconds,
            resend_seconds=settings.queue_resend_seconds,
            backlog=self.publisher.waiting_jobs,
        )
        self.deliveries = DeliveryScheduler(
            DeliveryRepository(self.sessions, settings.storage_dir),
            self.publisher.deliveries,
            resend_seconds=settings.queue_resend_seconds,
        )
        self.commitments = Commitments(
            DeliveryRepository(self.sessions, settings.storage_dir),
            RetryPolicy(
                base_seconds=settings.delivery_retry_base_seconds,
                cap_seconds=settings.delivery_retry_cap_seconds,
                max_attempts=settings.delivery_max_attempts,
            ),
            CommitmentTerms.from_settings(settings),
            settings.ae_title,
        )
        self.batch_items = BatchItemSweeper(
            BatchItems(self.sessions),
            self.publisher.batch_items,
            ItemTerms.from_settings(settings),
            resend_seconds=settings.queue_resend_seconds,
        )
        self.housekeeping = Housekeeping(settings, self.sessions)
        self._stop = threading.Event()

    def run(self) -> None:
        """Tick until :meth:`stop`; a failed pass (broker or database away) is
        logged and tried again at the next tick."""
        settings = self.settings
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.effective_database_url)
        self.housekeeping.start()
        tasks: list[tuple[str, float, Callable[[], object]]] = [
            ("job sweep", settings.job_check_interval, self.jobs.sweep),
            ("delivery scheduling", settings.delivery_check_interval, self.deliveries.schedule),
            ("commitment expiry", settings.delivery_check_interval, self.commitments.expire),
            ("batch item sweep", settings.job_check_interval, self.batch_items.sweep),
        ]
        next_run = [0.0] * len(tasks)
        failing: set[str] = set()
        logger.info("beat running")
        while not self._stop.is_set():
            now = time.monotonic()
            for index, (name, interval, task) in enumerate(tasks):
                if now < next_run[index]:
                    continue
                next_run[index] = now + interval
                try:
                    task()
                except Exception as exc:
                    if name not in failing:  # once per outage, not once per tick
                        logger.warning("%s failed (%s); trying again every tick", name, exc)
                        failing.add(name)
                else:
                    if name in failing:
                        logger.info("%s works again", name)
                        failing.discard(name)
            self._stop.wait(max(0.05, min(next_run) - time.monotonic()))
        self.housekeeping.stop()
        self.engine.dispose()
        logger.info("beat stopped")

    def stop(self) -> None:
        self._stop.set()
