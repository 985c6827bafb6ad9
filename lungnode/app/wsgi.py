"""The API alone, for a WSGI server: ``gunicorn -c python:lungnode.app.gunicorn_conf``
(the ``api`` role), or ``gunicorn --preload 'lungnode.app.wsgi:app'`` with
gunicorn's options of your own.

Importing this module reads the settings, refuses unsafe ones, migrates the
database, creates the first admin if there is none (printing a generated
password once, to standard error) and builds the app. ``--preload`` does this
once in the master process instead of once per worker; the workers then drop
the database connections inherited from it, never sharing one with the master.
Rate limits are counted per process unless ``rate_limit_storage_uri`` (or a
Redis broker) names a Redis. With ``queue = "celery"`` the items of a
``/batch-predict`` go to the workers through the broker. The histograms of
``/metrics`` are summed over the workers when a multiprocess folder is set
(:mod:`lungnode.app.metrics_dir`; ``gunicorn_conf`` sets one up): this module
exports it before it imports prometheus-client, through the API.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from flask import Flask

from lungnode.app.metrics_dir import use_metrics_dir
from lungnode.config import Settings, load_settings

if TYPE_CHECKING:
    from lungnode.api.context import BatchQueue


def build_app() -> Flask:
    settings = load_settings()
    settings.check_safe_to_start()
    settings.check_safe_to_serve_http()
    # Before anything imports prometheus-client (the API below does).
    use_metrics_dir(settings, processes=1, empty=False)

    from lungnode.api import create_app, ensure_first_admin
    from lungnode.app.database import connect
    from lungnode.app.metrics import PROCESS_METRICS
    from lungnode.app.receiving import stow_receiving
    from lungnode.db.repo import NodeRepository

    database = connect(settings)
    password = ensure_first_admin(database.sessions, settings)
    if password:
        print(f"lungnode: created user 'admin' with password {password}", file=sys.stderr)
    # A forked worker opens its own connections (SQLAlchemy's recipe for pools and fork).
    os.register_at_fork(after_in_child=lambda: database.engine.dispose(close=False))
    return create_app(
        settings,
        engine=database.engine,
        metrics=PROCESS_METRICS,
        batch_queue=_batch_queue(settings),
        # STOW-RS into the shared storage and database; the scp role's completion
        # timer, which reads both, completes the series.
        receiving=stow_receiving(settings, NodeRepository(database.sessions, settings.storage_dir)),
    )


def _batch_queue(settings: Settings) -> BatchQueue | None:
    """With Celery workers, /batch-predict hands its items to them (202); without,
    the API runs them in the request (201)."""
    if settings.queue != "celery":
        return None
    from lungnode.app.celery_app import CeleryPublisher, make_celery_app

    # The broker connection is made at the first publish, in the gunicorn worker.
    return CeleryPublisher(make_celery_app(settings)).batch_items_queued


app = build_app()
