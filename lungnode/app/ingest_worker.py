"""The main of an ingest worker process (``ingest_processes`` > 1).

The node hands accepted DICOM connections to these processes
(:mod:`lungnode.dicom.ingest_workers`); each runs them with the same SCP
handlers, intake and database as the node. This module is the wiring: its own
engine, repository and intake, logging, and signals. Workers never import
TensorFlow: they only receive.
"""

from __future__ import annotations

import logging
import signal
import socket
from types import FrameType

from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.repo import NodeRepository
from lungnode.db.session import make_engine, make_session_factory
from lungnode.dicom.ingest_workers import (
    ASSOCIATION_ENDED,
    CONNECTION_CLOSED,
    NodeChannel,
    WorkerConfig,
)
from lungnode.dicom.intake import Intake
from lungnode.dicom.scp import StorageSCP

logger = logging.getLogger(__name__)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_worker(config: WorkerConfig, channel: socket.socket, name: str) -> None:
    """Receive handed-over connections until the node goes (closes the channel)."""
    # Ctrl-C reaches the whole process group: the node stops its workers by
    # closing their channels, so a worker ignores it. A SIGTERM meant for the
    # worker alone (or for everything, from a service manager) stops it cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)-7s %(name)s [{name}]: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    node = NodeChannel(channel)
    engine = make_engine(
        config.database_url, pool_size=config.db_pool_size, max_overflow=config.db_max_overflow
    )
    sessions = make_session_factory(engine)
    repo = NodeRepository(sessions, config.storage_dir)
    intake = Intake(
        config.incoming_dir,
        repo.register_instance,
        config.min_free_bytes,
        page_cache_bytes=config.page_cache_bytes,
    )
    scp = StorageSCP(
        config.scp,
        intake,
        repo,
        on_association_ended=lambda: node.tell(ASSOCIATION_ENDED),
        on_connection_closed=lambda: node.tell(CONNECTION_CLOSED),
        commitment_reports=(
            DeliveryRepository(sessions, config.storage_dir)
            if config.scp.commitment_reports
            else None
        ),
    )
    scp.start_handed_over()
    logger.debug("%s ready", name)
    try:
        node.receive_connections(scp)
    finally:
        scp.stop()
        engine.dispose()
        logger.debug("%s stopped", name)
