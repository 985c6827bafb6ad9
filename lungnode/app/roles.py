"""The scaled roles' commands: ``lungnode scp``, ``api``, ``worker`` and ``beat``.

``serve`` runs everything in one process on the local queue. The roles split
it for a node that outgrows one box: several ``scp`` and ``worker`` processes,
on several hosts, share one database, one storage volume and one Celery broker
(``queue = "celery"``, ``broker_url``). docs/deploy.md shows the topologies.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

from lungnode.app.celery_app import QUEUES
from lungnode.app.commands import _log_settings, _no_huge_pages_for_numpy
from lungnode.config import Settings
from lungnode.errors import ConfigError, ListenError

logger = logging.getLogger("lungnode")


def _require_celery(settings: Settings, role: str) -> None:
    settings.check_safe_to_start()
    if settings.queue != "celery":
        raise ConfigError(
            f"lungnode {role} is a role of the scaled mode: set LUNGNODE_QUEUE=celery and "
            "LUNGNODE_BROKER_URL (or run everything in one process with 'lungnode serve')"
        )


def _stop_event() -> threading.Event:
    """Set by SIGTERM or SIGINT."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    return stop


def cmd_scp(settings: Settings, args: argparse.Namespace) -> int:
    from lungnode.app.scp import ReceivingNode

    _require_celery(settings, "scp")
    _log_settings(settings)
    node = ReceivingNode(settings)
    stop = _stop_event()
    try:
        node.start()
    except ListenError:
        node.stop()  # what started before the port was refused: stopped, not left
        raise
    logger.info("ready: DICOM %s on port %d (scp role)", settings.ae_title, node.port)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication
    from gunicorn.util import import_app

    from lungnode.app.api_server import prepare_api_role

    options = prepare_api_role(settings)
    _log_settings(settings)

    class ApiRole(BaseApplication):  # type: ignore[misc]
        """gunicorn run from Python with the role's options (no command line of its own)."""

        def load_config(self) -> None:
            for name, value in options.items():
                self.cfg.set(name, value)

        def load(self) -> Any:
            return import_app(self.cfg.wsgi_app)

    ApiRole().run()
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    _no_huge_pages_for_numpy()
    from lungnode.app import worker

    _require_celery(settings, "worker")
    names = [name.strip() for name in args.queues.split(",") if name.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise ConfigError(f"unknown queue(s) {unknown or names}: choose from {sorted(QUEUES)}")
    _log_settings(settings)
    concurrency = args.concurrency or settings.worker_concurrency
    return worker.run(settings, [QUEUES[name] for name in names], concurrency)


def cmd_beat(settings: Settings, args: argparse.Namespace) -> int:
    from lungnode.app.beat import Beat

    _require_celery(settings, "beat")
    _log_settings(settings)
    beat = Beat(settings)
    stop = _stop_event()

    def _stop_beat() -> None:
        stop.wait()
        beat.stop()

    threading.Thread(target=_stop_beat, name="stop-beat", daemon=True).start()
    beat.run()
    return 0
