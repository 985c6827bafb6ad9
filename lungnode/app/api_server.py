"""The ``api`` role: gunicorn serving ``lungnode.app.wsgi:app``, from Python.

``api_workers`` processes of ``api_threads`` threads each, on ``http_host`` and
``http_port``. The app is loaded once in the master (gunicorn's preload):
the settings are checked, the database migrated and the first admin created
once, and a bad setting stops the role before any worker starts. Each worker
then drops the database connections it inherited (SQLAlchemy's rule for
engines across a fork) and opens its own.
"""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from lungnode.config import Settings


class ApiServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options: dict[str, Any] = {
            "bind": [f"{settings.http_host}:{settings.http_port}"],
            "workers": settings.api_workers,
            "threads": settings.api_threads,
            "worker_class": "gthread",
            "preload_app": True,
            "loglevel": settings.log_level.lower(),
            "accesslog": None,
            "post_fork": _drop_inherited_connections,
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        from lungnode.app.wsgi import app

        return app


def _drop_inherited_connections(server: Any, worker: Any) -> None:
    from lungnode.app import wsgi

    # close=False: the master's connections stay the master's; this worker only
    # forgets them and opens its own.
    wsgi.database.engine.dispose(close=False)


def run(settings: Settings) -> int:
    ApiServer(settings).run()
    return 0
