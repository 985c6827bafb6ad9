"""The ``scp`` role: intake, the series assembler and the completion timer alone.

No analysis and no API. A completed series becomes a queued job row, and a
Celery message carrying its id goes to the workers. Several ``scp`` processes,
on one host or several behind a TCP load balancer, may share one database and
one storage volume:

- completion is decided from the database (every instance and association of
  the series, whichever process received it) and recorded by a guarded
  transition (``NodeRepository.complete_series``), so it fires once;
- a late instance reopens a complete series by a guarded update on the row,
  whichever process completed it, and the next completion queues a new version;
- unlike ``serve``, a starting ``scp`` does not close the associations it finds
  open: they may be another process's, alive. One left open by a crash only
  keeps rule 2 (release and grace) from applying; the quiet timer completes
  its series.
"""

from __future__ import annotations

import logging

from lungnode.app.celery_app import CeleryPublisher, make_celery_app
from lungnode.app.receiving import Receiver
from lungnode.config import Settings
from lungnode.db.migrate import upgrade
from lungnode.db.repo import NodeRepository
from lungnode.db.session import make_engine, make_session_factory

logger = logging.getLogger(__name__)


class ReceivingNode:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.effective_database_url)
        self.sessions = make_session_factory(self.engine)
        self.repo = NodeRepository(self.sessions, settings.storage_dir)
        self.publisher = CeleryPublisher(make_celery_app(settings))
        self.receiver = Receiver(settings, self.repo, on_job_queued=self.publisher.job_queued)

    @property
    def port(self) -> int:
        return self.receiver.scp.port

    def start(self) -> None:
        self.settings.storage_dir.mkdir(parents=True, exist_ok=True)
        upgrade(self.settings.effective_database_url)
        self.receiver.start()

    def stop(self) -> None:
        logger.info("stopping")
        self.receiver.stop_listening()
        self.receiver.stop()
        self.engine.dispose()
        logger.info("stopped")
