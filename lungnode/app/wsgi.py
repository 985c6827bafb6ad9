"""The API alone, for a WSGI server: ``gunicorn --preload 'lungnode.app.wsgi:app'``.

Importing this module reads the settings, refuses unsafe ones, migrates the
database, creates the first admin if there is none (printing a generated
password once, to standard error) and builds the app. ``--preload`` does this
once in the master process instead of once per worker. Rate limits are
counted per process unless ``rate_limit_storage_uri`` names a Redis.
"""

from __future__ import annotations

import sys

from lungnode.api import create_app, ensure_first_admin
from lungnode.app.database import connect
from lungnode.app.metrics import PROCESS_METRICS
from lungnode.config import load_settings

settings = load_settings()
settings.check_safe_to_start()
database = connect(settings)
_password = ensure_first_admin(database.sessions, settings)
if _password:
    print(f"lungnode: created user 'admin' with password {_password}", file=sys.stderr)
app = create_app(settings, engine=database.engine, metrics=PROCESS_METRICS)
