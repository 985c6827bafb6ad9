"""The embedded node: SCP, completion timer, job workers and API in one process.

``lungnode serve`` builds one :class:`Node`; tests build one on free ports.
Start-up order makes a restart safe: migrate, close associations a crash left
open, re-queue interrupted jobs, make every pending delivery due (the node is the
only sender on its database, so a claim a crash left is nobody's), register files
stored but not recorded, and only then listen. The receiving side is
:class:`lungnode.app.receiving.Receiver`, which the ``scp`` role runs alone.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from werkzeug.serving import BaseWSGIServer, make_server

from lungnode.addresses import host_port
from lungnode.api import create_app, ensure_first_admin
from lungnode.app.housekeeping import Housekeeping
from lungnode.app.https import server_context
from lungnode.app.metrics import PROCESS_METRICS
from lungnode.app.receiving import Receiver, stow_receiving
from lungnode.config import Settings
from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.jobs import JobRepository
from lungnode.db.migrate import upgrade
from lungnode.db.repo import NodeRepository
from lungnode.db.session import engine_for, make_session_factory
from lungnode.errors import BundleError, listen_error
from lungnode.pipeline.commitment import CommitmentTerms
from lungnode.pipeline.cpu_priority import MODEL_NICENESS
from lungnode.pipeline.intake_pace import IntakePace
from lungnode.pipeline.jobs import JobHandler, JobRetryPolicy, LocalJobQueue
from lungnode.pipeline.outbox import Outbox, RetryPolicy
from lungnode.pipeline.preparation import Preparations
from lungnode.pipeline.prescore import Prescorer, SliceScores
from lungnode.pipeline.series_job import SeriesJob, make_series_job
from lungnode.pipeline.spare_cpu import SpareCpu
from lungnode.pipeline.warmup import ModelState, WarmModel

if TYPE_CHECKING:  # loads TensorFlow only when a bundle is loaded
    from lungnode.ml.bundle import ModelBundle

logger = logging.getLogger(__name__)


@dataclass
class _Status:
    node: Node

    @property
    def scp_listening(self) -> bool:
        return self.node.scp.listening


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket for the API on ``host:port`` (the address family as Werkzeug
    would choose it), or a :class:`ListenError` that says why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # ``::`` takes IPv4 too where the system can, as Werkzeug's own socket does.
    dualstack = family == socket.AF_INET6 and socket.has_dualstack_ipv6()
    try:
        return socket.create_server(
            (host, port), family=family, backlog=128, dualstack_ipv6=dualstack
        )
    except OSError as exc:
        raise listen_error(exc, "the API", host, port, "LUNGNODE_HTTP_PORT") from exc


class Node:
    def __init__(
        self,
        settings: Settings,
        job_handler: JobHandler | None = None,
        *,
        analyse: bool = False,
        serve_http: bool = True,
    ) -> None:
        """``analyse=True`` runs the series job (model, writers, outbox) on completed
        series; otherwise ``job_handler`` runs, and with neither, jobs stay queued."""
        self.settings = settings
        self.engine = engine_for(settings)
        self.sessions = make_session_factory(self.engine)
        self.repo = NodeRepository(self.sessions, settings.storage_dir)
        self.outbox = Outbox(
            DeliveryRepository(self.sessions, settings.storage_dir),
            {peer.name: peer for peer in settings.peers},
            settings.ae_title,
            RetryPolicy(
                base_seconds=settings.delivery_retry_base_seconds,
                cap_seconds=settings.delivery_retry_cap_seconds,
                max_attempts=settings.delivery_max_attempts,
            ),
            interval=settings.delivery_check_interval,
            timeout=settings.delivery_timeout,
            commitment=CommitmentTerms.from_settings(settings),
            dicomweb_peers={peer.name: peer for peer in settings.dicomweb_peers},
        )
        self.analyse = analyse
        #: The model bundle, loaded and warmed in the background from start():
        #: for the series jobs and the API's /predict alike.
        self.model: WarmModel | None = None
        #: Scores slices of receiving series as they arrive (``pipeline.prescore``).
        self.prescorer: Prescorer | None = None
        #: Analyses and renders series while their grace runs (``SeriesJob.prepare``).
        self.preparations: Preparations | None = None
        #: The series job of ``analyse=True`` (None with a ``job_handler`` of the caller's).
        self.series_job: SeriesJob | None = None
        if analyse and job_handler is None:
            slice_scores = None
            if settings.workers > 0:
                self.model = WarmModel(self._load_bundle, niceness=MODEL_NICENESS)
                if settings.prescore_slices:
                    slice_scores = SliceScores()
                    self.prescorer = Prescorer(
                        self.repo.receiving_instances_after,
                        self._warm_bundle,
                        slice_scores,
                        spare_cpu=SpareCpu(),
                        intake_busy=IntakePace(self.repo.newest_instance_id),
                    )
            series_job = make_series_job(
                settings,
                self.sessions,
                on_recorded=self.outbox.wake,
                on_stage_timings=PROCESS_METRICS.observe_stages,
                bundle=self.model.bundle if self.model is not None else None,
                slice_scores=slice_scores,
            )
            if settings.workers > 0 and settings.prepare_during_grace:
                self.preparations = Preparations(series_job.prepare)
            self.series_job = series_job
            job_handler = series_job
        self.jobs = LocalJobQueue(
            JobRepository(self.sessions),
            job_handler,
            settings.workers,
            JobRetryPolicy.from_settings(settings),
            interval=settings.job_check_interval,
        )
        self.receiver = Receiver(settings, self.repo, on_job_queued=self.jobs.submit)
        if self.preparations is not None:
            self.receiver.watcher.on_settling = self.preparations.submit
        self.intake = self.receiver.intake
        self.watcher = self.receiver.watcher
        self.ingest_workers = self.receiver.ingest_workers
        self.scp = self.receiver.scp
        self.serve_http = serve_http
        self.housekeeping = Housekeeping(settings, self.sessions)
        self._http: BaseWSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def start(self) -> None:
        settings = self.settings
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        settings.incoming_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.effective_database_url)
        password = ensure_first_admin(self.sessions, settings)
        if password is not None:
            # Shown once, on the console only: it is never logged or stored in clear.
            print(
                f"\nCreated the API user 'admin' with the password: {password}\n"
                "Store it now; it will not be shown again. "
                "(Set LUNGNODE_ADMIN_PASSWORD to choose it.)\n",
                flush=True,
            )
        closed = self.repo.close_interrupted_associations()
        if closed:
            logger.info("closed %d association(s) interrupted by a stop", closed)
        if self.analyse and settings.workers > 0:
            self._check_model_bundle()
        self.jobs.start()
        # The only sender on this database: what a crash (or a stop) left claimed
        # would otherwise wait out its lease.
        released = self.outbox.deliveries.release_all()
        if released:
            logger.info("%d pending delivery(ies) due now, at start", released)
        self.outbox.start()
        self.housekeeping.start()
        self.receiver.start()
        if self.serve_http:
            app = create_app(
                settings,
                node_status=_Status(self),
                engine=self.engine,
                metrics=PROCESS_METRICS,
                model=self.model,
                # STOW-RS through the SCP's own intake; a request's end wakes the timer.
                receiving=stow_receiving(settings, self.repo, self.watcher.wake),
            )
            cert, key = settings.http_tls_cert, settings.http_tls_key
            # Bound here, not by Werkzeug: on a failed bind it prints and exits.
            listener = _listen(settings.http_host, settings.http_port)
            try:
                self._http = make_server(
                    settings.http_host,
                    settings.http_port,
                    app,
                    threaded=True,
                    ssl_context=server_context(cert, key) if cert and key else None,
                    fd=listener.fileno(),
                )
            finally:
                listener.close()  # the server holds its own descriptor of it
            # A short poll interval: a stop waits up to one for the server's loop.
            self._http_thread = threading.Thread(
                target=functools.partial(self._http.serve_forever, poll_interval=0.1),
                name="http",
                daemon=True,
            )
            self._http_thread.start()
            logger.info(
                "API listening on %s://%s/api/v1",
                "https" if settings.http_tls_cert else "http",
                host_port(settings.http_host, self.http_port),
            )
        if self.model is not None:
            # Last, and in the background: importing TensorFlow would slow the
            # SCP's start. A job that starts first waits for the model.
            self.model.start()
        if self.prescorer is not None:
            self.prescorer.start()
        if self.preparations is not None:
            self.preparations.start()

    def _check_model_bundle(self) -> None:
        """Refuse to start analysing with a bundle that is missing or does not verify.

        Reads the manifest and hashes the weights; TensorFlow loads later, while
        the model warms (:class:`lungnode.pipeline.warmup.WarmModel`).
        """
        from lungnode.ml.bundle import read_manifest, resolve_bundle_path, sha256_file

        settings = self.settings
        bundle_dir = resolve_bundle_path(settings.model, settings.models_dir)
        manifest = read_manifest(bundle_dir, trust_pickle=settings.trust_pickle)
        if sha256_file(bundle_dir / manifest.weights) != manifest.sha256:
            raise BundleError(f"model bundle {bundle_dir}: weights do not match the manifest")
        logger.info("model bundle %s %s at %s", manifest.name, manifest.version, bundle_dir)

    def _warm_bundle(self) -> ModelBundle | None:
        """The model if it is warm, None while it warms (or failed): never waits."""
        if self.model is None or self.model.state is not ModelState.READY:
            return None
        return self.model.bundle()

    def _load_bundle(self) -> ModelBundle:
        from lungnode.ml.bundle import load_bundle

        settings = self.settings
        return load_bundle(settings.model, settings.models_dir, trust_pickle=settings.trust_pickle)

    @property
    def http_port(self) -> int:
        return int(self._http.port) if self._http else self.settings.http_port

    def stop(self) -> bool:
        """Stop listening first, then let the timer and workers finish.

        Running jobs get until ``stop_timeout_seconds`` after the stop began; a
        job still running then is queued again for the next start. Returns
        True when threads are left running (a given-up job, or the model still
        warming): the process should then end at once, without waiting on them.
        """
        deadline = time.monotonic() + self.settings.stop_timeout_seconds
        logger.info("stopping")
        self.housekeeping.stop()
        self.receiver.stop_listening()
        if self._http is not None:
            self._http.shutdown()
            self._http = None
        self.receiver.stop()
        if self.prescorer is not None:
            self.prescorer.stop()
        if self.preparations is not None:
            self.preparations.stop()
        given_up = self.jobs.stop(timeout=max(0.0, deadline - time.monotonic()))
        self.outbox.stop()
        self.engine.dispose()
        warming = self.model is not None and self.model.state is ModelState.WARMING
        logger.info(
            "stopped%s",
            f"; job(s) {given_up} queued again for the next start" if given_up else "",
        )
        return bool(given_up) or warming
