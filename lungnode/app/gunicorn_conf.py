"""gunicorn's configuration file for the ``api`` role, from the node's settings.

    gunicorn -c python:lungnode.app.gunicorn_conf

runs ``lungnode.app.wsgi:app`` as :func:`lungnode.app.api_server.gunicorn_options`
says (bind, workers, threads, TLS, trusted proxies, metrics hooks). Options
given on gunicorn's command line win over these. gunicorn imports this file
once, in its master, before it loads the app: so the settings are checked
and the metrics folder exported before any worker starts.
"""

from __future__ import annotations

from lungnode.app.api_server import prepare_api_role
from lungnode.config import load_settings

globals().update(prepare_api_role(load_settings()))
