"""Per-request plumbing: request ids, one access-log line, security headers, CORS, limits.

The access line holds method, path (never the query string, which may carry
a Study Instance UID), status, duration, user id, client address (the one
behind a trusted proxy: :mod:`lungnode.api.proxies`) and request id; nothing
from bodies, so no patient data reaches the log.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from apiflask import APIFlask
from flask import Response, g, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from lungnode.api import context
from lungnode.config import Settings

access_log = logging.getLogger("lungnode.api.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: Swagger UI loads its script and styles from a CDN; everything else is JSON or an image.
_DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'"
)
_API_CSP = "default-src 'none'; frame-ancestors 'none'"


def init_request_logging(app: APIFlask) -> None:
    @app.before_request
    def _start() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()
        g.user_id = None

    @app.after_request
    def _finish(response: Response) -> Response:
        duration = time.perf_counter() - g.get("started", time.perf_counter())
        response.headers["X-Request-ID"] = g.get("request_id", "")
        route = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        context.metrics().observe_request(request.method, route, response.status_code, duration)
        access_log.info(
            "%s %s %d %.1fms user=%s from=%s request_id=%s",
            request.method,
            request.path,
            response.status_code,
            duration * 1000,
            g.get("user_id") or "-",
            request.remote_addr or "-",
            g.get("request_id", "-"),
        )
        return response


def init_security_headers(app: APIFlask, docs_path: str) -> None:
    @app.after_request
    def _headers(response: Response) -> Response:
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        headers.setdefault(
            "Content-Security-Policy", _DOCS_CSP if request.path == docs_path else _API_CSP
        )
        headers.setdefault("Cache-Control", "no-store")
        if request.is_secure:
            headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response


def init_cors(app: APIFlask, settings: Settings) -> None:
    """CORS only for the configured origins; with none, no CORS headers at all.

    It covers the REST API and DICOMweb (a browser viewer such as OHIF calls
    ``/dicomweb`` with a bearer token).
    """
    if not settings.cors_origins:
        return
    CORS(
        app,
        resources={
            r"/api/*": {"origins": settings.cors_origins},
            r"/dicomweb/*": {"origins": settings.cors_origins},
        },
        allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID"],
        expose_headers=["X-Request-ID", "Retry-After", "Content-Location"],
        supports_credentials=False,
        max_age=600,
    )


#: Seconds a Redis command of the limiter or the cache may take: an unreachable
#: Redis costs a request this long, never a hang.
REDIS_TIMEOUT_SECONDS = 0.5


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


def rate_limit_storage(settings: Settings) -> str:
    if settings.rate_limit_storage_uri:
        return settings.rate_limit_storage_uri
    if settings.queue == "celery" and is_redis_url(settings.broker_url):
        return settings.broker_url
    return "memory://"


def init_limiter(app: APIFlask, settings: Settings) -> Limiter:
    """One limiter per app: per-IP default limits, storage in memory or Redis.

    With Redis, every gunicorn worker and every API process counts against the
    same limits. When Redis cannot be reached the limiter counts in memory (per
    process) until it can again, rather than answer every request with 500.
    """
    storage = rate_limit_storage(settings)
    app.config.update(
        RATELIMIT_STORAGE_URI=storage,
        RATELIMIT_HEADERS_ENABLED=True,
        RATELIMIT_DEFAULT=settings.rate_limit_default,
        RATELIMIT_KEY_PREFIX="lungnode",
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=True,
    )
    if is_redis_url(storage):
        app.config["RATELIMIT_STORAGE_OPTIONS"] = {
            "socket_timeout": REDIS_TIMEOUT_SECONDS,
            "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
        }
    return Limiter(get_remote_address, app=app)
