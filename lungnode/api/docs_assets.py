"""Swagger UI's scripts and styles, served by the node itself.

A hospital network often has no route to public CDNs; the docs page at
``/api/v1/docs`` must work without one. The files come from the
``swagger-ui-bundle`` package.
"""

from __future__ import annotations

from pathlib import Path

from apiflask import APIBlueprint, APIFlask
from flask import Response, abort, send_from_directory

ASSETS = ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css")


def _assets_dir() -> Path:
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


def init_docs_assets(app: APIFlask, prefix: str) -> None:
    """Point the docs page at local copies of Swagger UI, under ``<prefix>/docs/assets/``."""
    blueprint = APIBlueprint("docs_assets", __name__, enable_openapi=False)

    @blueprint.get("/docs/assets/<name>")
    def docs_asset(name: str) -> Response:
        if name not in ASSETS:
            abort(404)
        response = send_from_directory(_assets_dir(), name, max_age=3600)
        return response

    app.register_blueprint(blueprint, url_prefix=prefix)
    base = f"{prefix}/docs/assets"
    app.config.update(
        SWAGGER_UI_CSS=f"{base}/swagger-ui.css",
        SWAGGER_UI_BUNDLE_JS=f"{base}/swagger-ui-bundle.js",
        SWAGGER_UI_STANDALONE_PRESET_JS=f"{base}/swagger-ui-standalone-preset.js",
    )
