"""The ``api`` role: the API alone under gunicorn, configured from the settings.

:func:`prepare_api_role` is what the role's gunicorn master runs first:
refuse unsafe settings, export the metrics folder before prometheus-client is
imported (the workers inherit it), and return gunicorn's options:
``http_host`` and ``http_port``, ``api_workers`` processes of ``api_threads``
threads, HTTPS with ``http_tls_cert``/``http_tls_key``, forwarded headers
from ``trusted_proxies`` only, and the hooks that keep the summed metrics
right. :mod:`lungnode.app.gunicorn_conf` hands them to gunicorn's command
(``gunicorn -c python:lungnode.app.gunicorn_conf``); a command that starts
gunicorn from Python can use the same dictionary.
"""

from __future__ import annotations

import os
from typing import Any

from lungnode.addresses import host_port
from lungnode.app.metrics_dir import ENV, remove_made_metrics_dir, use_metrics_dir
from lungnode.config import Settings

WSGI_APP = "lungnode.app.wsgi:app"


def child_exit(server: Any, worker: Any) -> None:
    """A worker ended: prometheus-client forgets its live gauges (its histograms stay)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    remove_made_metrics_dir()


def _gunicorn_knows(name: str) -> bool:
    from gunicorn.config import KNOWN_SETTINGS

    return any(setting.name == name for setting in KNOWN_SETTINGS)


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn settings for the ``api`` role (names as in gunicorn's documentation)."""
    options: dict[str, Any] = {
        "wsgi_app": WSGI_APP,
        "bind": [host_port(settings.http_host, settings.http_port)],
        "workers": settings.api_workers,
        "threads": settings.api_threads,
        "worker_class": "gthread" if settings.api_threads > 1 else "sync",
        # Migrations and the first admin once, in the master (lungnode.app.wsgi).
        "preload_app": True,
        # X-Forwarded-Proto and the like only from the proxies the settings trust;
        # the rest of the forwarded headers are lungnode.api.proxies' business.
        "forwarded_allow_ips": ",".join(settings.trusted_proxies),
        "child_exit": child_exit,
        "on_exit": on_exit,
    }
    if _gunicorn_knows("control_socket_disable"):
        # gunicorn >= 24 listens on one control socket per user by default
        # ($HOME/.gunicorn/gunicorn.ctl): two API processes on one host would share it.
        options["control_socket_disable"] = True
    if settings.http_tls_cert is not None and settings.http_tls_key is not None:
        options["certfile"] = str(settings.http_tls_cert)
        options["keyfile"] = str(settings.http_tls_key)
    return options


def prepare_api_role(settings: Settings) -> dict[str, Any]:
    """Check the settings, export the metrics folder, and return gunicorn's options.

    Run it once, in the process that becomes gunicorn's master, before
    anything imports prometheus-client.
    """
    settings.check_safe_to_start()
    settings.check_safe_to_serve_http()
    use_metrics_dir(settings, processes=settings.api_workers, empty=True)
    return gunicorn_options(settings)
