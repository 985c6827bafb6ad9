"""The receiving side of a node, as ``serve`` and ``scp`` both run it.

The Storage SCP, the ingest worker processes it hands connections to, the
intake that makes each instance durable, and the completion timer that turns
complete series into queued jobs. Wired once here; what happens to a queued
job (``on_job_queued``) is the caller's: the local pool wakes, or a Celery
message goes out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lungnode.api.context import Receiving
from lungnode.api.stow import clear_spool
from lungnode.app.ingest_worker import run_worker
from lungnode.config import Settings
from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.repo import NodeRepository
from lungnode.dicom.ingest_workers import IngestWorkers, WorkerConfig
from lungnode.dicom.intake import Intake, reconcile
from lungnode.dicom.scp import SCPConfig, StorageSCP
from lungnode.pipeline.completion import CompletionWatcher
from lungnode.series.assembler import CompletionRules

logger = logging.getLogger(__name__)


def make_intake(settings: Settings, repo: NodeRepository) -> Intake:
    """The one durable intake of a process: C-STORE's, and STOW-RS's (``api.stow``)."""
    return Intake(
        settings.incoming_dir,
        repo.register_instance,
        min_free_bytes=settings.min_free_disk_mb * 2**20,
        page_cache_bytes=settings.intake_page_cache_mb * 2**20,
    )


def stow_receiving(
    settings: Settings, repo: NodeRepository, on_ended: Callable[[], None] = lambda: None
) -> Receiving:
    """What the API needs to receive studies by STOW-RS, and the spool it leaves behind
    cleared: parts a stopped process left (untouched for twice the network timeout, as
    ``reconcile`` treats stray ``.part`` files; another process may be receiving now)."""
    removed = clear_spool(settings.storage_dir, 2 * settings.network_timeout, time.time())
    if removed:
        logger.info("removed %d STOW-RS part(s) left spooled by a stop", removed)
    return Receiving(make_intake(settings, repo), repo, on_ended)


class Receiver:
    def __init__(
        self, settings: Settings, repo: NodeRepository, on_job_queued: Callable[[int], None]
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.intake = make_intake(settings, repo)
        self.watcher = CompletionWatcher(
            repo,
            CompletionRules(
                quiet_seconds=settings.series_quiet_seconds,
                grace_seconds=settings.series_grace_seconds,
                spacing_tolerance=settings.series_spacing_tolerance,
            ),
            on_job_queued=on_job_queued,
            interval=settings.series_check_interval,
        )
        allowed = None if settings.allow_unknown_callers else [p.ae_title for p in settings.peers]
        processes = settings.effective_ingest_processes
        scp_config = SCPConfig(
            ae_title=settings.ae_title,
            host=settings.dicom_host,
            port=settings.dicom_port,
            allowed_callers=allowed,
            # Shared between the receiving processes, each taking its part.
            max_associations=-(-settings.max_associations // processes),
            max_pdu_size=settings.max_pdu_size,
            network_timeout=settings.network_timeout,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            tls_ca=settings.tls_ca,
            commitment_reports=bool(settings.commit_peers),
            store_receiver=settings.store_receiver,
        )
        self.ingest_workers: IngestWorkers | None = None
        if processes > 1:
            self.ingest_workers = IngestWorkers(
                WorkerConfig(
                    scp=scp_config,
                    database_url=settings.effective_database_url,
                    incoming_dir=settings.incoming_dir,
                    storage_dir=settings.storage_dir,
                    min_free_bytes=settings.min_free_disk_mb * 2**20,
                    page_cache_bytes=settings.intake_page_cache_mb * 2**20,
                    log_level=settings.log_level,
                    db_pool_size=settings.db_pool_size,
                    db_max_overflow=settings.db_max_overflow,
                ),
                processes - 1,
                on_association_ended=self.watcher.wake,
                worker_main=run_worker,
            )
        self.scp = StorageSCP(
            scp_config,
            self.intake,
            repo,
            on_association_ended=self.watcher.wake,
            dispatcher=self.ingest_workers,
            commitment_reports=(
                DeliveryRepository(repo.sessions, settings.storage_dir)
                if scp_config.commitment_reports
                else None
            ),
        )

    def start(self) -> None:
        """Register files stored but not recorded, then judge series and listen."""
        settings = self.settings
        settings.incoming_dir.mkdir(parents=True, exist_ok=True)
        registered, unreadable = reconcile(
            settings.incoming_dir,
            self.repo.known_instance_paths(),
            self.repo.register_instance,
            # Another receiving process (on shared storage) may be writing one now.
            stale_part_seconds=2 * settings.network_timeout,
        )
        if registered or unreadable:
            logger.info(
                "reconciled storage: %d file(s) registered, %d unreadable", registered, unreadable
            )
        self.watcher.start()
        if self.ingest_workers is not None:
            self.ingest_workers.start()
        self.scp.start()

    def stop_listening(self) -> None:
        """Refuse new associations and end the ingest workers; the timer runs on."""
        if self.ingest_workers is not None:
            self.ingest_workers.stopping()
        self.scp.stop()
        if self.ingest_workers is not None:
            self.ingest_workers.stop()

    def stop(self) -> None:
        self.watcher.stop()
