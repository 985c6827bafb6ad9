"""One error type, one JSON shape: ``{"error": {"code", "message", "details"}}``.

Every failure answers this shape, whatever raised it: an :class:`APIError` in a
view, a schema validation error (422), an APIFlask ``HTTPError``, a Werkzeug
``HTTPException`` (404, 405, 413, a rate limit's 429), a token error from
flask-jwt-extended (401, see ``auth.py``), a full storage (507, with
``Retry-After``), or an unexpected exception (500, logged with its traceback,
answered without it).
"""

from __future__ import annotations

import logging
from typing import Any

from apiflask import APIFlask
from apiflask.exceptions import HTTPError
from apiflask.types import ResponseReturnValueType
from flask import jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from lungnode.errors import storage_full

logger = logging.getLogger(__name__)

#: The ``code`` of each status when the raiser gave none.
STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    507: "storage_full",
}

#: Seconds a client is told to wait when the storage is full (RFC 9110 10.2.3).
STORAGE_FULL_RETRY_AFTER = 60

#: The error shape as an OpenAPI schema (every documented 4xx/5xx response uses it).
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
            "required": ["code", "message", "details"],
        }
    },
    "required": ["error"],
}


class APIError(Exception):
    """Raise anywhere in a view; it becomes a JSON error with ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _code_for(status: int) -> str:
    return STATUS_CODES.get(status, "error" if status < 500 else "internal_error")


def register_error_handlers(app: APIFlask) -> None:
    """Install the handlers; call after APIFlask's own so that these replace them."""
    app.config["HTTP_ERROR_SCHEMA"] = ERROR_SCHEMA
    app.config["VALIDATION_ERROR_SCHEMA"] = ERROR_SCHEMA

    @app.error_processor
    def _apiflask_error(error: HTTPError) -> ResponseReturnValueType:
        # Validation errors (422) and APIFlask's abort(): details name the bad fields.
        details = error.detail if isinstance(error.detail, dict) else {}
        message = error.message or _code_for(error.status_code)
        if error.status_code == 422:
            message = "the request does not match the schema"
        body = error_body(_code_for(error.status_code), message, details)
        return body, error.status_code, error.headers

    @app.errorhandler(APIError)
    def _api_error(exc: APIError) -> ResponseReturnValue:
        return jsonify(error_body(exc.code, exc.message, exc.details)), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        status = exc.code or 500
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        message = exc.description or exc.name or "error"
        return jsonify(error_body(_code_for(status), message)), status, headers

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        if storage_full(exc):  # not a bug: the disk (or the database's) has no room
            logger.warning("request refused, the storage is full: %s", exc)
            body = error_body("storage_full", "the node's storage is full; try again later")
            return jsonify(body), 507, {"Retry-After": str(STORAGE_FULL_RETRY_AFTER)}
        logger.exception("unhandled error")
        return jsonify(error_body("internal_error", "internal server error")), 500
