"""Authentication: JWT access and refresh tokens, roles, and the first admin.

Tokens travel only in the ``Authorization: Bearer`` header, never in cookies,
so no CSRF protection is needed. The user is looked up on every request, so a
disabled user or a changed role takes effect at once, not at token expiry.
Every token failure answers 401 in the API's one error shape.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from typing import Any, TypeVar, cast

from apiflask import APIBlueprint, APIFlask
from flask import g, jsonify, request
from flask.typing import ResponseReturnValue
from flask_jwt_extended import (
    JWTManager,
    create_access_token,
    create_refresh_token,
    current_user,
    get_jwt_identity,
    jwt_required,
    verify_jwt_in_request,
)
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lungnode.api import context
from lungnode.api.errors import APIError, error_body
from lungnode.api.schemas import AccessTokenOut, LoginIn, TokensOut, UserOut
from lungnode.config import Settings
from lungnode.db.models import AuditEvent, Role, User
from lungnode.db.session import write_transaction
from lungnode.passwords import hash_password, verify_password

logger = logging.getLogger(__name__)

auth_blueprint = APIBlueprint("auth", __name__, tag="auth")
jwt = JWTManager()

#: Verified against when the user name is unknown, so both answers take as long.
_DUMMY_HASH = hash_password(secrets.token_hex(8))

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CurrentUser:
    id: int
    username: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN.value


def jwt_signing_key(settings: Settings) -> str:
    """The HS256 key: derived from ``secret_key``, for its own purpose only.

    Hashing gives the key the 32 bytes RFC 7518 3.2 asks of an HS256 key and
    separates it from Flask's own uses of the secret. It adds no entropy: a
    production node refuses to start with a short or default secret.
    """
    secret = settings.secret_key.get_secret_value().encode()
    return hashlib.sha256(b"lungnode jwt\x00" + secret).hexdigest()


def init_auth(app: APIFlask, settings: Settings) -> None:
    app.config.update(
        JWT_SECRET_KEY=jwt_signing_key(settings),
        JWT_ACCESS_TOKEN_EXPIRES=timedelta(minutes=settings.access_token_minutes),
        JWT_REFRESH_TOKEN_EXPIRES=timedelta(hours=settings.refresh_token_hours),
        JWT_TOKEN_LOCATION=["headers"],
    )
    jwt.init_app(app)
    app.security_schemes = {
        "BearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    }


def _unauthorized(message: str) -> ResponseReturnValue:
    return jsonify(error_body("unauthorized", message)), 401, {"WWW-Authenticate": "Bearer"}


@jwt.unauthorized_loader
def _missing_token(reason: str) -> ResponseReturnValue:
    return _unauthorized(f"missing or malformed token: {reason}")


@jwt.invalid_token_loader
def _invalid_token(reason: str) -> ResponseReturnValue:
    return _unauthorized(f"invalid token: {reason}")


@jwt.expired_token_loader
def _expired_token(_header: dict[str, Any], _payload: dict[str, Any]) -> ResponseReturnValue:
    return _unauthorized("token has expired")


@jwt.revoked_token_loader
def _revoked_token(_header: dict[str, Any], _payload: dict[str, Any]) -> ResponseReturnValue:
    return _unauthorized("token has been revoked")


@jwt.needs_fresh_token_loader
def _stale_token(_header: dict[str, Any], _payload: dict[str, Any]) -> ResponseReturnValue:
    return _unauthorized("a fresh token is required")


@jwt.user_lookup_error_loader
def _unknown_user(_header: dict[str, Any], _payload: dict[str, Any]) -> ResponseReturnValue:
    return _unauthorized("the token's user does not exist or is disabled")


@jwt.token_verification_failed_loader
def _verification_failed(_header: dict[str, Any], _payload: dict[str, Any]) -> ResponseReturnValue:
    return _unauthorized("token verification failed")


@jwt.user_lookup_loader
def _lookup_user(_header: dict[str, Any], payload: dict[str, Any]) -> CurrentUser | None:
    try:
        user_id = int(payload["sub"])
    except (KeyError, TypeError, ValueError):
        return None
    with context.reading() as session:
        user = session.get(User, user_id)
        if user is None or not user.active:
            return None
        return CurrentUser(user.id, user.username, user.role)


def the_user() -> CurrentUser:
    """The authenticated user of this request (inside a view guarded by :func:`roles`)."""
    return cast(CurrentUser, current_user)


def _document(view: Any, *statuses: int) -> None:
    """Mark a view as needing a bearer token in the OpenAPI document."""
    spec = view.__dict__.setdefault("_spec", {})
    spec["security"] = "BearerAuth"
    responses = spec.get("responses") or {}
    if isinstance(responses, list):
        responses = {code: "" for code in responses}
    wording = {401: "Missing, invalid or expired token", 403: "Role not allowed"}
    for status in statuses:
        responses.setdefault(status, wording[status])
    spec["responses"] = {code: text or str(code) for code, text in responses.items()}


#: The roles of people; ``roles()`` with none named admits any of them (not ``sender``,
#: an archive's account, which may only send studies: ``lungnode.api.stow``).
PERSON_ROLES = (Role.ADMIN, Role.RADIOLOGIST, Role.VIEWER)


def roles(*allowed: Role) -> Callable[[F], F]:
    """Require a valid access token, and one of ``allowed`` roles (any person's role,
    :data:`PERSON_ROLES`, if none given).

    Put it right under the route decorator, so that authentication is checked
    before the request body is validated.
    """
    names = {role.value for role in allowed or PERSON_ROLES}

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            verify_jwt_in_request()
            user = the_user()
            g.user_id = user.id
            if user.role not in names:
                message = f"role {user.role!r} may not do this"
                raise APIError(403, "forbidden", message, {"allowed": sorted(names)})
            return view(*args, **kwargs)

        _document(wrapper, 401, 403)
        return cast(F, wrapper)

    return decorator


#: What a 401 of a route that takes HTTP Basic as well as a token asks for.
BEARER_OR_BASIC = 'Bearer, Basic realm="lungnode", charset="UTF-8"'


def authenticate(*allowed: Role) -> CurrentUser:
    """The user of this request, by a bearer token or by HTTP Basic (RFC 7617: the user
    name and password of the same users), for clients that cannot log in for a token
    (archives sending by STOW-RS). Raises 401 without valid credentials, 403 for a
    role not in ``allowed``. Use it in views that must take both; :func:`roles`
    takes tokens only.
    """
    credentials = request.authorization
    if credentials is not None and credentials.type == "basic":
        user = _basic_user(credentials.username or "", credentials.password or "")
    else:
        verify_jwt_in_request()
        user = the_user()
    g.user_id = user.id
    names = {role.value for role in allowed}
    if user.role not in names:
        message = f"role {user.role!r} may not do this"
        raise APIError(403, "forbidden", message, {"allowed": sorted(names)})
    return user


def _basic_user(username: str, password: str) -> CurrentUser:
    with context.reading() as session:
        user = session.scalar(select(User).where(User.username == username))
        stored = user.password_hash if user is not None else _DUMMY_HASH
        ok = verify_password(password, stored)
        if user is None or not ok or not user.active:
            logger.info("HTTP Basic authentication refused")
            raise APIError(
                401,
                "invalid_credentials",
                "wrong user name or password",
                headers={"WWW-Authenticate": BEARER_OR_BASIC},
            )
        return CurrentUser(user.id, user.username, user.role)


def _tokens(user: User) -> dict[str, Any]:
    settings = context.settings()
    identity = str(user.id)
    claims = {"role": user.role}
    return {
        "access_token": create_access_token(identity, additional_claims=claims),
        "refresh_token": create_refresh_token(identity),
        "token_type": "Bearer",
        "expires_in": settings.access_token_minutes * 60,
    }


@auth_blueprint.post("/auth/login")
@auth_blueprint.input(LoginIn, location="json")
@auth_blueprint.output(TokensOut)
@auth_blueprint.doc(responses={401: "Wrong user name or password", 429: "Too many attempts"})
def login(json_data: dict[str, Any]) -> dict[str, Any]:
    """Exchange a user name and password for an access and a refresh token."""
    with context.reading() as session:
        user = session.scalar(select(User).where(User.username == json_data["username"]))
        stored = user.password_hash if user is not None else _DUMMY_HASH
        ok = verify_password(json_data["password"], stored)
        if user is None or not ok or not user.active:
            logger.info("login refused")
            raise APIError(401, "invalid_credentials", "wrong user name or password")
        logger.info("login ok: user %d", user.id)
        return _tokens(user)


@auth_blueprint.post("/auth/refresh")
@jwt_required(refresh=True)  # type: ignore[untyped-decorator]
@auth_blueprint.output(AccessTokenOut)
@auth_blueprint.doc(security="BearerAuth", responses={401: "Missing or invalid refresh token"})
def refresh() -> dict[str, Any]:
    """A new access token, for the refresh token in the Authorization header."""
    user = the_user()
    token = create_access_token(str(get_jwt_identity()), additional_claims={"role": user.role})
    expires_in = context.settings().access_token_minutes * 60
    return {"access_token": token, "token_type": "Bearer", "expires_in": expires_in}


@auth_blueprint.get("/auth/me")
@roles(*Role)
@auth_blueprint.output(UserOut)
def me() -> User:
    """The authenticated user."""
    with context.reading() as session:
        user = session.get(User, the_user().id)
        if user is None:  # deleted between the token check and here
            raise APIError(401, "unauthorized", "the token's user does not exist")
        return user


def login_username_key() -> str:
    """Rate-limit key for login attempts on one user name, whatever the client address."""
    body = request.get_json(silent=True)
    name = body.get("username") if isinstance(body, dict) else None
    return f"login-user:{name if isinstance(name, str) else ''}"[:100]


def ensure_first_admin(sessions: sessionmaker[Session], settings: Settings) -> str | None:
    """Create the user ``admin`` when no admin exists yet. Idempotent.

    The password is ``settings.admin_password``; when that is unset, one is
    generated and returned so that the caller can print it once. Returns None
    when nothing was created or the password came from the settings. The
    database must be migrated.
    """
    with sessions() as session:
        if session.scalar(select(User.id).where(User.role == Role.ADMIN.value).limit(1)):
            return None
        if session.scalar(select(User.id).where(User.username == "admin")):
            logger.warning("no admin user, and the name 'admin' is taken by another role")
            return None
    configured = settings.admin_password.get_secret_value() if settings.admin_password else ""
    password = configured or secrets.token_urlsafe(16)
    try:
        with write_transaction(sessions) as session:
            session.add(
                User(username="admin", role=Role.ADMIN.value, password_hash=hash_password(password))
            )
            session.add(AuditEvent(actor="system", action="user.create", target="admin"))
    except IntegrityError:  # another process created it meanwhile
        return None
    logger.info("created the first admin user 'admin'")
    return None if configured else password
