"""The API alone, for a WSGI server: ``gunicorn -c python:lungnode.app.gunicorn_conf``
(the ``api`` role), or ``gunicorn --preload 'lungnode.app.wsgi:app'`` with
gunicorn's options of your own.

Importing this module reads the settings, refuses unsafe ones, migrates the
database, creates the first admin if there is none (printing a generated
password once, to standard error) and builds the app. ``--preload`` does this
once in the master process instead of once per worker; the workers then drop
the database connections inherited from it, never sharing one with the master.
Rate limits are counted per process unless ``rate_limit_storage_uri`` (or a
Redis broker) names a Redis. The histograms of ``/metrics`` are summed over
the workers when a multiprocess folder is set (:mod:`lungnode.app.metrics_dir`;
``gunicorn_conf`` sets one up): this module exports it before it imports
prometheus-client, through the API.
"""

from __future__ import annotations

import os
import sys

from flask import Flask

from lungnode.app.metrics_dir import use_metrics_dir
from lungnode.config import load_settings


def build_app() -> Flask:
    settings = load_settings()
    settings.check_safe_to_start()
    settings.check_safe_to_serve_http()
    # Before anything imports prometheus-client (the API below does).
    use_metrics_dir(settings, processes=1, empty=False)

    from lungnode.api import create_app, ensure_first_admin
    from lungnode.app.database import connect
    from lungnode.app.metrics import PROCESS_METRICS

    database = connect(settings)
    password = ensure_first_admin(database.sessions, settings)
    if password:
        print(f"lungnode: created user 'admin' with password {password}", file=sys.stderr)
    # A forked worker opens its own connections (SQLAlchemy's recipe for pools and fork).
    os.register_at_fork(after_in_child=lambda: database.engine.dispose(close=False))
    return create_app(settings, engine=database.engine, metrics=PROCESS_METRICS)


app = build_app()
