"""The API alone, for a WSGI server: ``gunicorn --preload 'lungnode.api.wsgi:app'``.

Importing this module reads the settings, refuses unsafe ones, migrates the
database, creates the first admin if there is none (printing a generated
password once, to standard error) and builds the app. ``--preload`` does this
once in the master process instead of once per worker. Rate limits are
counted per process unless ``rate_limit_storage_uri`` names a Redis.
"""

from __future__ import annotations

import sys

from lungnode.api import create_app, ensure_first_admin
from lungnode.config import load_settings
from lungnode.db.migrate import upgrade
from lungnode.db.session import make_engine, make_session_factory

settings = load_settings()
settings.check_safe_to_start()
settings.storage_dir.mkdir(parents=True, exist_ok=True)
upgrade(settings.effective_database_url)
_engine = make_engine(settings.effective_database_url)
_password = ensure_first_admin(make_session_factory(_engine), settings)
if _password:
    print(f"lungnode: created user 'admin' with password {_password}", file=sys.stderr)
app = create_app(settings, engine=_engine)
