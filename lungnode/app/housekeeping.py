"""Periodic upkeep of the embedded node: at start, then hourly.

Today one task: delete uploads older than ``upload_retention_hours`` that no
prediction refers to (``lungnode cleanup`` runs the same once).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from lungnode.api import delete_stale_uploads
from lungnode.config import Settings

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 3600.0


class Housekeeping:
    """A daemon thread running the upkeep every ``interval`` seconds until stopped."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        interval: float = INTERVAL_SECONDS,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.interval = interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def run_once(self) -> list[Path]:
        """Run the upkeep now; returns the files removed."""
        removed = delete_stale_uploads(self.settings, self.sessions)
        if removed:
            logger.info("removed %d stale upload(s)", len(removed))
        return removed

    def _run(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:
                logger.exception("housekeeping failed; will try again")
            if self._stopping.wait(self.interval):
                return
