"""The web console: a small JavaScript application on top of ``/api/v1``, served at ``/``.

One HTML shell, ES modules and styles, and a vendored copy of Chart.js, all
from this package: a hospital network often has no route to a CDN, and the
console needs none. The shell is never cached; every other file lives under
``/console/<version>/``, where ``<version>`` is a hash of all of them, so
browsers may keep them for a year and still see a changed file at once.

The console keeps its access and refresh tokens in JavaScript memory only
(never in cookies or web storage): no cookie authenticates a request, so
cross-site request forgery has nothing to ride on, and a reload asks for the
password again.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from apiflask import APIBlueprint, APIFlask
from flask import Response, abort, send_from_directory

STATIC = Path(__file__).resolve().parent / "static"
#: A year: a changed file gets a new URL, never a stale copy.
ASSET_MAX_AGE = 365 * 24 * 3600

#: The shell loads scripts, styles and images from the node only; heatmaps and the
#: PDF come through fetch() with the bearer token and are shown as blob: URLs.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob: data:; connect-src 'self'; font-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_SUFFIXES = (".js", ".css", ".md")


@cache
def asset_version() -> str:
    """A hash over every asset's name and content: part of each asset's URL."""
    digest = hashlib.sha256()
    for path in sorted(STATIC.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(STATIC).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _shell() -> str:
    base = f"/console/{asset_version()}"
    return (STATIC / "index.html").read_text(encoding="utf-8").replace("{{BASE}}", base)


def init_console(app: APIFlask) -> None:
    """Serve the console's shell at ``/`` and its assets under ``/console/<version>/``."""
    blueprint = APIBlueprint("console", __name__, enable_openapi=False)

    @blueprint.get("/")
    def shell() -> Response:
        response = Response(_shell(), mimetype="text/html")
        response.headers["Content-Security-Policy"] = CONSOLE_CSP
        response.headers["Cache-Control"] = "no-store"
        return response

    @blueprint.get("/console/<version>/<path:name>")
    def asset(version: str, name: str) -> Response:
        if version != asset_version() or not name.endswith(_SUFFIXES) or name == "index.html":
            abort(404)
        response = send_from_directory(STATIC, name, max_age=ASSET_MAX_AGE)
        response.headers["Cache-Control"] = f"public, max-age={ASSET_MAX_AGE}, immutable"
        if name.endswith(".js"):
            response.mimetype = "text/javascript"
        return response

    app.register_blueprint(blueprint)
