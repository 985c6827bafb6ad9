"""The REST API: ``create_app()``, one blueprint per resource.

Importing this package must not import TensorFlow: the model loads lazily in
the workers.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from lungnode.api.context import NodeStatus
from lungnode.api.errors import register_error_handlers
from lungnode.api.health import health_blueprint
from lungnode.config import Settings, load_settings
from lungnode.db.session import make_engine, make_session_factory


def create_app(
    settings: Settings | None = None,
    node_status: NodeStatus | None = None,
    test_config: dict[str, Any] | None = None,
) -> Flask:
    """Build the Flask app. ``node_status`` is given when the SCP runs in this process."""
    settings = settings or load_settings()
    app = Flask("lungnode")
    app.config.update(
        SECRET_KEY=settings.secret_key.get_secret_value(),
        MAX_CONTENT_LENGTH=10 * 1024 * 1024,
        JSON_SORT_KEYS=False,
    )
    if test_config:
        app.config.update(test_config)
    engine = make_engine(settings.effective_database_url)
    app.extensions["lungnode"] = {
        "settings": settings,
        "engine": engine,
        "sessions": make_session_factory(engine),
        "node_status": node_status,
    }
    register_error_handlers(app)
    app.register_blueprint(health_blueprint, url_prefix="/api/v1")
    return app
