"""The ``api`` role: the API alone under gunicorn, configured from the settings.

:func:`prepare_api_role` is what the role's gunicorn master runs first:
refuse unsafe settings and return gunicorn's options: ``http_host`` and
``http_port``, ``api_workers`` processes of ``api_threads`` threads, the app
loaded once in the master (gunicorn's preload: the database migrated and the
first admin created once, and a bad setting stops the role before any worker
starts), and a hook that makes each worker drop the database connections it
inherited (SQLAlchemy's rule for engines across a fork) and open its own.
``lungnode api`` (:mod:`lungnode.app.roles`) hands them to gunicorn from Python.
"""

from __future__ import annotations

from typing import Any

from lungnode.config import Settings

WSGI_APP = "lungnode.app.wsgi:app"


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _drop_inherited_connections(server: Any, worker: Any) -> None:
    from lungnode.app import wsgi

    # close=False: the master's connections stay the master's; this worker only
    # forgets them and opens its own.
    wsgi.database.engine.dispose(close=False)


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn settings for the ``api`` role (names as in gunicorn's documentation)."""
    return {
        "wsgi_app": WSGI_APP,
        "bind": [bind_address(settings.http_host, settings.http_port)],
        "workers": settings.api_workers,
        "threads": settings.api_threads,
        "worker_class": "gthread" if settings.api_threads > 1 else "sync",
        "preload_app": True,
        "post_fork": _drop_inherited_connections,
    }


def prepare_api_role(settings: Settings) -> dict[str, Any]:
    """Check the settings and return gunicorn's options."""
    settings.check_safe_to_start()
    return gunicorn_options(settings)
