"""The Celery application of the scaled roles, and how the roles publish to it.

Only ids travel: "run job N", "send deliveries [..] to destination D",
"predict batch item N" (``/batch-predict``, on a queue of its own). The
rows stay the truth (``pipeline.sweeper`` explains why a lost or repeated
message is harmless). Settings that make a crash lose nothing:

- ``task_acks_late``: a message is acknowledged when its task has ended, not
  when it was received, so a worker that dies mid-job leaves it unacknowledged;
- ``task_reject_on_worker_lost``: when the pool process running a task dies
  (killed, out of memory), the message goes back to the queue at once;
- ``worker_prefetch_multiplier = 1``: a worker holds one message per process,
  so a waiting job goes to the next free worker, not behind a long one;
- Redis's ``visibility_timeout`` (``broker_visibility_timeout_seconds``) is
  longer than a job may run (``job_time_limit_seconds``, enforced): Redis
  hands an unacknowledged message to another worker only after it;
- publishing gives up after about two seconds, so the scp never waits long on
  a broker that is down: the job row is queued anyway and beat sends it later.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from lungnode.config import Settings

logger = logging.getLogger(__name__)

JOBS_QUEUE = "lungnode.jobs"
DELIVERIES_QUEUE = "lungnode.deliveries"
#: Items of /batch-predict: apart from the jobs, so that beat's count of waiting
#: job messages counts jobs only.
PREDICTIONS_QUEUE = "lungnode.predictions"
RUN_JOB = "lungnode.run_job"
SEND_DELIVERIES = "lungnode.send_deliveries"
PREDICT_BATCH_ITEM = "lungnode.predict_batch_item"
#: The queues a worker takes by name on the command line (``lungnode worker --queues``).
QUEUES = {"jobs": JOBS_QUEUE, "deliveries": DELIVERIES_QUEUE, "predictions": PREDICTIONS_QUEUE}
#: The queues that need the model loaded.
MODEL_QUEUES = (JOBS_QUEUE, PREDICTIONS_QUEUE)


def make_celery_app(settings: Settings) -> Celery:
    app = Celery("lungnode", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_seconds},
        task_routes={
            RUN_JOB: {"queue": JOBS_QUEUE},
            SEND_DELIVERIES: {"queue": DELIVERIES_QUEUE},
            PREDICT_BATCH_ITEM: {"queue": PREDICTIONS_QUEUE},
        },
        task_default_queue=JOBS_QUEUE,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        broker_connection_timeout=2.0,
        # A worker waits out a broker outage of any length, then carries on.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # A job running when the broker connection drops runs on and records its
        # results (the database is the truth); its message, unacknowledged, comes
        # back later and finds the job done. Cancelling it would throw the work away.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # lungnode.cli configures logging; Celery keeps its hands off it.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    return app


class CeleryPublisher:
    """Publishes job and delivery messages; a broker that does not take one is logged,
    not raised, where the row is the truth anyway (the scp's completion timer)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def job(self, job_id: int) -> None:
        """Send "run job N" (raises when the broker does not take it)."""
        self._send(RUN_JOB, [job_id], JOBS_QUEUE)

    def deliveries(self, destination: str, delivery_ids: list[int]) -> None:
        """Send "send these deliveries" (raises when the broker does not take it)."""
        self._send(SEND_DELIVERIES, [destination, delivery_ids], DELIVERIES_QUEUE)

    def batch_items(self, item_ids: list[int]) -> None:
        """Send "predict batch item N" for each (raises when the broker does not take one)."""
        for item_id in item_ids:
            self._send(PREDICT_BATCH_ITEM, [item_id], PREDICTIONS_QUEUE)

    def batch_items_queued(self, item_ids: list[int]) -> None:
        """A batch's items are pending rows: tell the workers, or leave it to
        ``lungnode beat`` to send them when the broker is back."""
        try:
            self.batch_items(item_ids)
        except (OperationalError, OSError) as exc:
            logger.warning(
                "batch items %s are pending, but the broker did not take their messages (%s); "
                "lungnode beat sends them once the broker is back",
                item_ids,
                exc,
            )

    def job_queued(self, job_id: int) -> None:
        """A series completed and its job row is queued: tell the workers, or leave
        it to ``lungnode beat`` to send when the broker is back."""
        try:
            self.job(job_id)
        except (OperationalError, OSError) as exc:
            logger.warning(
                "job %d is queued, but the broker did not take its message (%s); "
                "lungnode beat sends it once the broker is back",
                job_id,
                exc,
            )

    def waiting_jobs(self) -> int | None:
        """Messages waiting in the jobs queue; None when the broker cannot say."""
        try:
            with self.app.connection_for_write() as connection:
                declared: Any = connection.default_channel.queue_declare(
                    queue=JOBS_QUEUE, passive=True
                )
                return int(declared.message_count)
        except Exception as exc:  # any broker trouble: unknown, and beat re-sends
            logger.debug("could not count the jobs queue: %s", exc)
            return None

    def _send(self, name: str, args: list[Any], queue: str) -> None:
        self.app.send_task(name, args=args, queue=queue, retry=True)
