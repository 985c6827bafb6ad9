"""Login, refresh, me, token failures, login rate limit, the first admin, and users."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from flask_jwt_extended import create_access_token

from lungnode.api import ensure_first_admin
from lungnode.config import Settings
from lungnode.db.migrate import upgrade
from lungnode.db.models import AuditEvent, Role, User
from lungnode.db.session import make_engine, make_session_factory
from lungnode.passwords import verify_password
from tests.api.conftest import ADMIN_PASSWORD, API, PASSWORD


def _error(response: object, status: int, code: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.json  # type: ignore[attr-defined]
    body = response.json["error"]  # type: ignore[attr-defined]
    assert set(body) == {"code", "message", "details"}
    if code is not None:
        assert body["code"] == code
    return dict(body)


def test_login_me_refresh(api: API) -> None:
    response = api.client.post(
        "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert response.status_code == 200
    tokens = response.json
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 15 * 60
    me = api.client.get(
        "/api/v1/auth/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert me.status_code == 200
    assert me.json["username"] == "admin" and me.json["role"] == "admin"
    assert "password_hash" not in me.json
    refreshed = api.client.post(
        "/api/v1/auth/refresh", headers={"Authorization": f"Bearer {tokens['refresh_token']}"}
    )
    assert refreshed.status_code == 200 and refreshed.json["access_token"]
    # A refresh token is no access token, and the other way round.
    _error(
        api.client.get(
            "/api/v1/auth/me", headers={"Authorization": f"Bearer {tokens['refresh_token']}"}
        ),
        401,
    )
    _error(
        api.client.post(
            "/api/v1/auth/refresh", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        ),
        401,
    )


@pytest.mark.parametrize(
    "body",
    [
        {"username": "admin", "password": "wrong"},
        {"username": "nobody", "password": "whatever"},
    ],
)
def test_wrong_credentials_are_401(api: API, body: dict[str, str]) -> None:
    _error(api.client.post("/api/v1/auth/login", json=body), 401, "invalid_credentials")


def test_login_validation(api: API) -> None:
    details = _error(api.client.post("/api/v1/auth/login", json={"username": "x"}), 422)
    assert "password" in details["details"]["json"]  # type: ignore[index]
    _error(
        api.client.post("/api/v1/auth/login", data="{not json", content_type="application/json"),
        400,
    )
    _error(api.client.get("/api/v1/auth/login"), 405, "method_not_allowed")


def test_token_failures_are_401(api: API) -> None:
    _error(api.client.get("/api/v1/auth/me"), 401, "unauthorized")
    _error(api.client.get("/api/v1/auth/me", headers={"Authorization": "Bearer nonsense"}), 401)
    _error(api.client.get("/api/v1/auth/me", headers={"Authorization": "Basic abc"}), 401)
    with api.app.app_context():
        expired = create_access_token("1", expires_delta=timedelta(seconds=-10))
        ghost = create_access_token("999")
    body = _error(
        api.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {expired}"}), 401
    )
    assert "expired" in str(body["message"])
    _error(api.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {ghost}"}), 401)


def test_token_signed_with_another_key_is_401(api: API, make_api: Callable[..., API]) -> None:
    other = make_api(secret_key="another-secret-key-entirely")
    token = other.token("admin")
    _error(api.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"}), 401)


def test_disabled_user_is_refused_at_once(api: API) -> None:
    headers = api.headers("viewer")
    assert api.client.get("/api/v1/auth/me", headers=headers).status_code == 200
    patch = api.client.patch(
        f"/api/v1/users/{api.users['viewer']}", json={"active": False}, headers=api.headers("admin")
    )
    assert patch.status_code == 200 and patch.json["active"] is False
    _error(api.client.get("/api/v1/auth/me", headers=headers), 401)
    _error(
        api.client.post("/api/v1/auth/login", json={"username": "viewer", "password": PASSWORD}),
        401,
    )


def test_login_is_rate_limited_per_ip_and_per_user(make_api: Callable[..., API]) -> None:
    api = make_api(rate_limit_login="3/minute")
    for _ in range(3):
        api.client.post("/api/v1/auth/login", json={"username": "admin", "password": "x"})
    body = _error(
        api.client.post("/api/v1/auth/login", json={"username": "admin", "password": "x"}),
        429,
        "rate_limited",
    )
    assert body["message"]
    limited = api.client.post("/api/v1/auth/login", json={"username": "admin", "password": "x"})
    assert "Retry-After" in limited.headers
    # Another client address still may not hammer the same user name.
    other_ip = {"REMOTE_ADDR": "10.9.8.7"}
    _error(
        api.client.post(
            "/api/v1/auth/login",
            json={"username": "admin", "password": "x"},
            environ_base=other_ip,
        ),
        429,
    )
    # Health and metrics are never limited.
    for _ in range(5):
        assert api.client.get("/api/v1/metrics").status_code == 200


def test_default_limit_answers_429(make_api: Callable[..., API]) -> None:
    api = make_api(rate_limit_default="2/minute")
    headers = api.headers("viewer")  # login has its own limit
    statuses = [api.client.get("/api/v1/auth/me", headers=headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_first_admin_from_settings_then_idempotent(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(admin_password="from-the-settings")
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    sessions = make_session_factory(engine)
    assert ensure_first_admin(sessions, settings) is None
    assert ensure_first_admin(sessions, settings) is None
    with sessions() as session:
        admins = session.query(User).filter(User.role == Role.ADMIN.value).all()
        assert [a.username for a in admins] == ["admin"]
        assert verify_password("from-the-settings", admins[0].password_hash)
        assert session.query(AuditEvent).filter(AuditEvent.action == "user.create").count() == 1
    engine.dispose()


def test_first_admin_password_is_generated_once(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    sessions = make_session_factory(engine)
    password = ensure_first_admin(sessions, settings)
    assert password and len(password) >= 16
    assert ensure_first_admin(sessions, settings) is None
    with sessions() as session:
        admin = session.query(User).filter(User.username == "admin").one()
        assert verify_password(password, admin.password_hash)
    engine.dispose()


def test_users_admin_lifecycle(api: API) -> None:
    admin = api.headers("admin")
    listed = api.client.get("/api/v1/users", headers=admin)
    assert [u["username"] for u in listed.json["items"]] == ["admin", "radiologist", "viewer"]
    created = api.client.post(
        "/api/v1/users",
        json={"username": "dr-new", "password": "long-enough", "role": "radiologist"},
        headers=admin,
    )
    assert created.status_code == 201 and created.json["role"] == "radiologist"
    _error(
        api.client.post(
            "/api/v1/users", json={"username": "dr-new", "password": "long-enough"}, headers=admin
        ),
        409,
        "conflict",
    )
    _error(
        api.client.post(
            "/api/v1/users", json={"username": "x", "password": "short"}, headers=admin
        ),
        422,
    )
    _error(
        api.client.post(
            "/api/v1/users",
            json={"username": "y", "password": "long-enough", "role": "king"},
            headers=admin,
        ),
        422,
    )
    user_id = created.json["id"]
    changed = api.client.patch(f"/api/v1/users/{user_id}", json={"role": "viewer"}, headers=admin)
    assert changed.status_code == 200 and changed.json["role"] == "viewer"
    _error(api.client.patch("/api/v1/users/999", json={"active": False}, headers=admin), 404)
    _error(api.client.patch(f"/api/v1/users/{user_id}", json={"bogus": 1}, headers=admin), 422)
    # The last active admin cannot be demoted or disabled.
    _error(api.client.patch("/api/v1/users/1", json={"role": "viewer"}, headers=admin), 409)
    _error(api.client.patch("/api/v1/users/1", json={"active": False}, headers=admin), 409)
    with api.app.extensions["lungnode"]["sessions"]() as session:
        actions = [e.action for e in session.query(AuditEvent).order_by(AuditEvent.id)]
    assert actions.count("user.create") == 2 and "user.update" in actions
