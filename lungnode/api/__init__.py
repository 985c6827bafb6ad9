"""The REST API: ``create_app()``, one blueprint per resource, all under ``/api/v1``.

Built on APIFlask rather than flask-smorest: it is a thin Flask subclass, so
views stay plain Flask views, and one decorator each declares a view's input
(validated before the view runs, 422 on mismatch), its output (serialised
through the schema) and its documented responses. The OpenAPI 3.1 document
at ``/api/v1/openapi.json`` and Swagger UI at ``/api/v1/docs`` come from those
same declarations, so the document cannot drift from the code; schemathesis
checks the running server against it.

Importing this package must not import TensorFlow: the model loads lazily on
the first prediction.
"""

from __future__ import annotations

from typing import Any

from apiflask import APIFlask
from flask import Flask
from sqlalchemy import Engine
from werkzeug.routing import IntegerConverter, Map

from lungnode import __version__
from lungnode.api.auth import (
    auth_blueprint,
    ensure_first_admin,
    init_auth,
    login,
    login_username_key,
)
from lungnode.api.batches import batches_blueprint
from lungnode.api.cache import make_cache
from lungnode.api.console import init_console
from lungnode.api.context import BatchQueue, ModelSource, NodeStatus, Receiving
from lungnode.api.dicomweb_query import dicomweb_query_blueprint
from lungnode.api.dicomweb_retrieve import dicomweb_retrieve_blueprint
from lungnode.api.docs_assets import init_docs_assets
from lungnode.api.errors import register_error_handlers
from lungnode.api.health import health, health_blueprint
from lungnode.api.history import history_blueprint
from lungnode.api.metrics import Metrics, metrics_blueprint
from lungnode.api.metrics import metrics as metrics_view
from lungnode.api.middleware import (
    init_cors,
    init_limiter,
    init_request_logging,
    init_security_headers,
)
from lungnode.api.node import node_blueprint
from lungnode.api.predict import predict_blueprint
from lungnode.api.proxies import TrustedProxies
from lungnode.api.reports import reports_blueprint
from lungnode.api.stats import stats_blueprint
from lungnode.api.stow import store_instances, store_study_instances, stow_blueprint
from lungnode.api.uploads import delete_stale_uploads, uploads_blueprint
from lungnode.api.users import users_blueprint
from lungnode.config import Settings, load_settings
from lungnode.db.session import engine_for, make_session_factory, read_sessions

__all__ = ["Metrics", "Receiving", "create_app", "delete_stale_uploads", "ensure_first_admin"]

PREFIX = "/api/v1"
#: DICOMweb (PS3.18) lives beside the REST API, outside its OpenAPI document.
DICOMWEB_PREFIX = "/dicomweb"
DOCS_PATH = f"{PREFIX}/docs"

#: multipart/form-data is what APIFlask documents for these; a JSON body is accepted too.
_JSON_ALTERNATIVES: dict[str, dict[str, Any]] = {
    f"{PREFIX}/predict": {
        "type": "object",
        "properties": {"file_id": {"type": "string", "minLength": 1, "maxLength": 64}},
        "required": ["file_id"],
        "additionalProperties": False,
    },
    f"{PREFIX}/batch-predict": {
        "type": "object",
        "properties": {
            "file_ids": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": 64},
            },
            "batch_name": {"type": "string", "minLength": 1, "maxLength": 200},
        },
        "required": ["file_ids"],
        "additionalProperties": False,
    },
}


def _complete_spec(spec: dict[str, Any] | str) -> dict[str, Any] | str:
    """Document what the decorators cannot say: JSON alternatives, the 202 of a batch
    on the queue, and 400 for bad bodies."""
    if not isinstance(spec, dict):
        return spec
    for path, schema in _JSON_ALTERNATIVES.items():
        operation = spec.get("paths", {}).get(path, {}).get("post")
        if operation and "requestBody" in operation:
            operation["requestBody"]["content"]["application/json"] = {"schema": schema}
    batch = spec.get("paths", {}).get(f"{PREFIX}/batch-predict", {}).get("post")
    if batch and "201" in batch["responses"]:
        location = {
            "description": "the batch's poll_url",
            "schema": {"type": "string"},
        }
        batch["responses"]["201"]["headers"] = {"Location": location}
        batch["responses"]["202"] = {
            "description": "Accepted (queue = celery): the items wait for the workers; "
            "GET poll_url for their results",
            "content": batch["responses"]["201"]["content"],
            "headers": {"Location": location},
        }
    error = {"$ref": "#/components/schemas/HTTPError"}
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation["responses"].setdefault(
                    "400",
                    {
                        "description": "Malformed body (unparseable JSON or multipart)",
                        "content": {"application/json": {"schema": error}},
                    },
                )
    return spec


#: The largest row id: the id columns are SQL INTEGER, 32 bits on PostgreSQL.
MAX_ROW_ID = 2**31 - 1


def _digits_at_most(limit: int) -> str:
    """A regular expression for the decimal numbers from 0 to ``limit``."""
    digits = str(limit)
    shorter = [rf"\d{{1,{len(digits) - 1}}}"] if len(digits) > 1 else []
    same_length = [digits]
    for i, digit in enumerate(map(int, digits)):
        lowest = 1 if i == 0 and len(digits) > 1 else 0
        if digit > lowest:
            rest = len(digits) - i - 1
            same_length.append(
                f"{digits[:i]}[{lowest}-{digit - 1}]" + rf"\d{{{rest}}}" * bool(rest)
            )
    return "|".join(shorter + same_length)


class RowIdConverter(IntegerConverter):
    """``<int:...>`` in routes: at most the largest row id.

    A larger number matches no route (404), instead of reaching the database,
    which on PostgreSQL refuses it (a 500). The range is in the pattern, not only
    checked after matching: werkzeug answers a number that fails the check with
    405 when another method's route has the same path.
    """

    regex = f"(?:{_digits_at_most(MAX_ROW_ID)})"

    def __init__(self, url_map: Map, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max", MAX_ROW_ID)
        super().__init__(url_map, *args, **kwargs)


def create_app(
    settings: Settings | None = None,
    node_status: NodeStatus | None = None,
    test_config: dict[str, Any] | None = None,
    engine: Engine | None = None,
    metrics: Metrics | None = None,
    model: ModelSource | None = None,
    batch_queue: BatchQueue | None = None,
    receiving: Receiving | None = None,
) -> Flask:
    """Build the app. ``node_status`` is given when the SCP runs in this process.

    ``engine``: the node's own engine when it runs in the same process, so that
    the API's writers and the node's take turns on one SQLite write lock.
    ``metrics``: the process's histograms (``lungnode.app`` passes its own);
    without it the app keeps its own.
    ``model``: the node's own model bundle, warmed at its start, for ``/predict``
    and ``/health``; without it the app loads the bundle at the first prediction.
    ``batch_queue``: with it, ``/batch-predict`` stores the batch, hands its items to
    it and answers 202 (workers run them); without it, the request runs them (201).

    The database must already be migrated (``lungnode serve`` and ``wsgi.py`` do it).
    """
    settings = settings or load_settings()
    app = APIFlask(
        "lungnode",
        title="lungnode API",
        version=__version__,
        spec_path=f"{PREFIX}/openapi.json",
        docs_path=DOCS_PATH,
        docs_oauth2_redirect_path=None,
    )
    max_file = settings.max_upload_mb * 2**20
    app.config.update(
        SECRET_KEY=settings.secret_key.get_secret_value(),
        # A batch carries up to max_batch_size files; each file is checked on its own.
        MAX_CONTENT_LENGTH=max_file * settings.max_batch_size + 2**20,
        JSON_SORT_KEYS=False,
        AUTO_SERVERS=False,
        # OpenAPI 3.0: what the bundled Swagger UI (and most client generators) read.
        OPENAPI_VERSION="3.0.3",
        DESCRIPTION="REST API of lungnode, a DICOM node for lung CT. For research use only.",
    )
    if test_config:
        app.config.update(test_config)
    engine = engine or engine_for(settings)
    sessions = make_session_factory(engine)
    app.extensions["lungnode"] = {
        "settings": settings,
        "engine": engine,
        "sessions": sessions,
        "read_sessions": read_sessions(sessions),
        "node_status": node_status,
        "metrics": metrics or Metrics(),
        "cache": make_cache(settings),
        "bundle": None,
        "model": model,
        "batch_queue": batch_queue,
        "receiving": receiving,
    }
    app.url_map.converters["int"] = RowIdConverter
    register_error_handlers(app)
    init_auth(app, settings)
    init_request_logging(app)
    init_security_headers(app, DOCS_PATH)
    init_cors(app, settings)
    init_docs_assets(app, PREFIX)
    init_console(app)
    for blueprint in (
        health_blueprint,
        metrics_blueprint,
        auth_blueprint,
        users_blueprint,
        uploads_blueprint,
        predict_blueprint,
        batches_blueprint,
        history_blueprint,
        reports_blueprint,
        stats_blueprint,
        node_blueprint,
    ):
        app.register_blueprint(blueprint, url_prefix=PREFIX)
    for dicomweb in (dicomweb_query_blueprint, dicomweb_retrieve_blueprint, stow_blueprint):
        app.register_blueprint(dicomweb, url_prefix=DICOMWEB_PREFIX)
    app.spec_processor(_complete_spec)

    limiter = init_limiter(app, settings)
    limiter.exempt(health)
    limiter.exempt(metrics_view)
    # Login: counted per client address and per user name, whichever runs out first.
    login_limited = limiter.limit(lambda: settings.rate_limit_login)(login)
    login_limited = limiter.limit(lambda: settings.rate_limit_login, key_func=login_username_key)(
        login_limited
    )
    app.view_functions["auth.login"] = login_limited
    # A DICOMweb viewer fetches a study's metadata, frames and bulk data by the
    # hundred: its reads have a limit of their own, not the REST API's.
    for reads in (dicomweb_query_blueprint, dicomweb_retrieve_blueprint):
        limiter.limit(lambda: settings.rate_limit_dicomweb)(reads)
    # STOW-RS takes HTTP Basic: its failed authentications count as login attempts.
    for view in (store_instances, store_study_instances):
        app.view_functions[f"stow.{view.__name__}"] = limiter.limit(
            lambda: settings.rate_limit_login,
            deduct_when=lambda response: response.status_code == 401,
        )(view)
    if settings.trusted_proxies:
        # Outermost: the client address behind a proxy is what the limiter and the log see.
        app.wsgi_app = TrustedProxies(app.wsgi_app, settings.trusted_proxies)  # type: ignore[method-assign]
    return app
