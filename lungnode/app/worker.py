"""The ``worker`` role: a Celery worker that runs analysis jobs and sends deliveries.

Pool: prefork with one child process by default (``worker_concurrency``), not
``--pool solo``. The parent only talks to the broker and watches its child;
the child imports TensorFlow, loads and warms the model once
(``worker_process_init``) and runs the jobs. So:

- the model is never loaded in a process that forks (TensorFlow's threads and
  CUDA state do not survive a fork);
- a job that kills its process (out of memory, a GPU fault, ``kill -9``) kills
  the child only: the parent records the attempt as lost, puts the message back
  (``task_reject_on_worker_lost``) and starts a fresh child, which warms the
  model again; with ``--pool solo`` the whole worker would go, and the job would
  wait for its lease to run out;
- the hard time limit (``job_time_limit_seconds``) can be enforced: only a
  pool with child processes can kill a job that hangs.

A job task claims the job row (``pipeline.jobs.run_job``, a guarded transition:
two workers never run one job), holds a lease on it while it runs
(``db.leases``) and runs the same series job as ``serve``. The device is the
one TensorFlow finds: ``CUDA_VISIBLE_DEVICES`` chooses it, and the child logs
what it sees. A delivery task claims the deliveries it names and sends them
with the outbox's retries, back-off and dead letters. A batch item task runs
one image of a ``/batch-predict`` (``pipeline.batches.run_batch_item``, the
prediction ``/predict`` makes), claimed the same guarded way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Celery, Task, signals
from celery.worker.request import Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from lungnode.app.autograph_files import remove_autograph_files
from lungnode.app.celery_app import (
    DELIVERIES_QUEUE,
    MODEL_QUEUES,
    PREDICT_BATCH_ITEM,
    RUN_JOB,
    SEND_DELIVERIES,
    make_celery_app,
)
from lungnode.app.metrics import PROCESS_METRICS
from lungnode.config import Settings
from lungnode.db.batches import BatchItems
from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.jobs import JobRepository
from lungnode.db.leases import JobLeases
from lungnode.db.session import make_engine, make_session_factory
from lungnode.pipeline.batches import ItemTerms, give_up_lost_item, run_batch_item
from lungnode.pipeline.commitment import CommitmentTerms
from lungnode.pipeline.cpu_priority import MODEL_NICENESS
from lungnode.pipeline.jobs import JobHandler, JobRetryPolicy, LeaseTerms, run_job
from lungnode.pipeline.outbox import Outbox, RetryPolicy
from lungnode.pipeline.series_job import make_series_job
from lungnode.pipeline.sweeper import give_up_lost_attempt
from lungnode.pipeline.warmup import WarmModel

if TYPE_CHECKING:
    from lungnode.ml.bundle import ModelBundle

logger = logging.getLogger(__name__)


@dataclass
class _Process:
    """What one worker process opens once: the database, the model, the job handler."""

    pid: int
    engine: Engine
    sessions: sessionmaker[Session]
    repo: JobRepository
    batch_items: BatchItems
    leases: JobLeases
    outbox: Outbox
    model: WarmModel | None
    handler: JobHandler | None


class WorkerRole:
    """The Celery app with the lungnode tasks, and each process's resources."""

    def __init__(self, settings: Settings, *, analyse: bool = True) -> None:
        self.settings = settings
        self.analyse = analyse
        self.app: Celery = make_celery_app(settings)
        self._process: _Process | None = None
        self._parent_sessions: sessionmaker[Session] | None = None
        self._register()

    # -- per process -------------------------------------------------------------------

    def process(self) -> _Process:
        """This process's resources, opened on first use (again in a new child)."""
        if self._process is None or self._process.pid != os.getpid():
            self._process = self._open()
        return self._process

    def _open(self) -> _Process:
        settings = self.settings
        engine = make_engine(settings.effective_database_url)
        sessions = make_session_factory(engine)
        deliveries = DeliveryRepository(sessions, settings.storage_dir)
        outbox = Outbox(
            deliveries,
            {peer.name: peer for peer in settings.peers},
            settings.ae_title,
            RetryPolicy(
                base_seconds=settings.delivery_retry_base_seconds,
                cap_seconds=settings.delivery_retry_cap_seconds,
                max_attempts=settings.delivery_max_attempts,
            ),
            timeout=settings.delivery_timeout,
            commitment=CommitmentTerms.from_settings(settings),
            dicomweb_peers={peer.name: peer for peer in settings.dicomweb_peers},
        )
        model = WarmModel(self._load_bundle, niceness=MODEL_NICENESS) if self.analyse else None
        handler = None
        if model is not None:
            handler = make_series_job(
                settings,
                sessions,
                on_stage_timings=PROCESS_METRICS.observe_stages,
                bundle=model.bundle,
            )
        return _Process(
            os.getpid(),
            engine,
            sessions,
            JobRepository(sessions),
            BatchItems(sessions),
            JobLeases(sessions),
            outbox,
            model,
            handler,
        )

    def _load_bundle(self) -> ModelBundle:
        from lungnode.ml.bundle import load_bundle

        settings = self.settings
        bundle = load_bundle(
            settings.model, settings.models_dir, trust_pickle=settings.trust_pickle
        )
        import tensorflow as tf

        devices = [device.name for device in tf.config.list_physical_devices()]
        logger.info(
            "TensorFlow sees %s (CUDA_VISIBLE_DEVICES=%s)",
            ", ".join(devices) or "no device",
            os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
        )
        return bundle

    def _on_process_init(self, **_: Any) -> None:
        """A new pool process: open its resources and start warming the model."""
        process = self.process()
        if process.model is not None:
            process.model.start()

    def _on_process_shutdown(self, **_: Any) -> None:
        if self._process is not None and self._process.pid == os.getpid():
            self._process.engine.dispose()
        # A pool process ends with os._exit, which skips autograph's own removal.
        remove_autograph_files()

    # -- the parent's view of a lost child ----------------------------------------------

    def parent_sessions(self) -> sessionmaker[Session]:
        """The parent's sessions, without a pooled connection: nothing of it may be
        inherited by the next child."""
        if self._parent_sessions is None:
            engine = make_engine(self.settings.effective_database_url, poolclass=NullPool)
            self._parent_sessions = make_session_factory(engine)
        return self._parent_sessions

    def attempt_lost(self, job_id: int, why: str) -> None:
        """In the parent: the child running ``job_id`` died. Give the attempt up now,
        so the message put back on the queue finds the job due (after its back-off)."""
        leases = JobLeases(self.parent_sessions())
        attempt = leases.running_attempt(job_id)
        if attempt is not None:
            give_up_lost_attempt(
                leases, job_id, attempt, JobRetryPolicy.from_settings(self.settings), why
            )

    def item_lost(self, item_id: int, why: str) -> None:
        """In the parent: the child running batch item ``item_id`` died. Give the
        attempt up now, so the message put back on the queue finds it pending."""
        items = BatchItems(self.parent_sessions())
        attempt = items.running_attempt(item_id)
        if attempt is not None:
            give_up_lost_item(items, item_id, attempt, ItemTerms.from_settings(self.settings), why)

    # -- tasks ------------------------------------------------------------------------------

    def _register(self) -> None:
        role = self
        settings = self.settings

        class JobRequest(Request):  # type: ignore[misc]
            def on_failure(self, exc_info: Any, send_failed_event: bool = True, **kw: Any) -> Any:
                exc = getattr(exc_info.exception, "exc", exc_info.exception)
                if isinstance(exc, WorkerLostError | TimeLimitExceeded | SystemExit):
                    why = f"{type(exc).__name__}: {exc}"
                    try:
                        if self.task_name == PREDICT_BATCH_ITEM:
                            role.item_lost(int(self.args[0]), why)
                        else:
                            role.attempt_lost(int(self.args[0]), why)
                    except Exception:  # the lease sweeper in beat still recovers it
                        logger.exception("could not give up the lost attempt of %s", self.task_name)
                return super().on_failure(exc_info, send_failed_event, **kw)

        class JobTask(Task):  # type: ignore[misc]
            Request = JobRequest

        @self.app.task(  # type: ignore[untyped-decorator]
            name=RUN_JOB,
            base=JobTask,
            acks_late=True,
            reject_on_worker_lost=True,
            time_limit=settings.job_time_limit_seconds,
        )
        def run_job_task(job_id: int) -> None:
            process = role.process()
            if process.handler is None:
                raise RuntimeError("this worker does not take the jobs queue")
            run_job(
                process.repo,
                process.handler,
                job_id,
                JobRetryPolicy.from_settings(settings),
                LeaseTerms(process.leases, settings.job_lease_seconds),
            )

        @self.app.task(  # type: ignore[untyped-decorator]
            name=PREDICT_BATCH_ITEM,
            base=JobTask,
            acks_late=True,
            reject_on_worker_lost=True,
            time_limit=settings.job_time_limit_seconds,
        )
        def predict_batch_item_task(item_id: int) -> None:
            process = role.process()
            if process.model is None:
                raise RuntimeError("this worker does not take the predictions queue")
            run_batch_item(
                process.batch_items,
                item_id,
                process.model.bundle,
                settings,
                process.sessions,
                ItemTerms.from_settings(settings),
            )

        @self.app.task(  # type: ignore[untyped-decorator]
            name=SEND_DELIVERIES, acks_late=True, reject_on_worker_lost=True
        )
        def send_deliveries_task(destination: str, delivery_ids: Sequence[int]) -> None:
            process = role.process()
            claimed = process.outbox.deliveries.claim(delivery_ids, settings.delivery_timeout)
            if claimed:
                process.outbox.deliver(destination, claimed)

        # A child has this long to report ready; opening its database must fit,
        # on a busy host too (the model warms afterwards, in the background).
        self.app.conf.worker_proc_alive_timeout = 60.0
        signals.worker_process_init.connect(self._on_process_init, weak=False)
        signals.worker_process_shutdown.connect(self._on_process_shutdown, weak=False)

    def argv(self, queues: Sequence[str], concurrency: int, name: str | None = None) -> list[str]:
        """The ``celery worker`` command line for these queues."""
        return [
            "worker",
            "--pool=prefork",
            f"--concurrency={concurrency}",
            f"--queues={','.join(queues)}",
            f"--hostname={name or f'lungnode-{os.getpid()}'}@%h",
            f"--loglevel={self.settings.log_level.upper()}",
            # No worker-to-worker chatter: nothing here needs it, and it costs
            # a second at start and broker traffic forever.
            "--without-mingle",
            "--without-gossip",
        ]


def run(settings: Settings, queues: Sequence[str], concurrency: int) -> int:
    """Run a worker until it is stopped (SIGTERM: warm shutdown, running jobs finish)."""
    role = WorkerRole(settings, analyse=any(queue in MODEL_QUEUES for queue in queues))
    if DELIVERIES_QUEUE in queues and not (settings.peers or settings.dicomweb_peers):
        logger.warning("no peers configured: deliveries can only be dead-lettered")
    role.app.worker_main(role.argv(queues, concurrency))
    return 0
