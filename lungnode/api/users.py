"""``/users``: admins list, create, disable and change the role of API users."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint
from sqlalchemy import func, select

from lungnode.api import context
from lungnode.api.auth import roles, the_user
from lungnode.api.errors import APIError
from lungnode.api.schemas import UserIn, UserList, UserOut, UserPatch
from lungnode.db.models import AuditEvent, Role, User
from lungnode.passwords import hash_password

users_blueprint = APIBlueprint("users", __name__, tag="users")


@users_blueprint.get("/users")
@roles(Role.ADMIN)
@users_blueprint.output(UserList)
def list_users() -> dict[str, Any]:
    """Every user, oldest first."""
    with context.reading() as session:
        return {"items": list(session.scalars(select(User).order_by(User.id)))}


@users_blueprint.post("/users")
@roles(Role.ADMIN)
@users_blueprint.input(UserIn, location="json")
@users_blueprint.output(UserOut, status_code=201)
@users_blueprint.doc(responses={409: "User name or email taken"})
def create_user(json_data: dict[str, Any]) -> User:
    """Create a user with a role (default viewer)."""
    with context.writing() as session:
        taken = session.scalar(
            select(func.count())
            .select_from(User)
            .where(
                (User.username == json_data["username"])
                | ((User.email == json_data["email"]) & (User.email.is_not(None)))
            )
        )
        if taken:
            raise APIError(409, "conflict", "user name or email already taken")
        user = User(
            username=json_data["username"],
            email=json_data["email"],
            role=json_data["role"],
            password_hash=hash_password(json_data["password"]),
        )
        session.add(user)
        session.add(
            AuditEvent(
                actor=the_user().username,
                action="user.create",
                target=json_data["username"],
                details={"role": json_data["role"]},
            )
        )
        session.flush()
        return user


@users_blueprint.patch("/users/<int:user_id>")
@roles(Role.ADMIN)
@users_blueprint.input(UserPatch, location="json")
@users_blueprint.output(UserOut)
@users_blueprint.doc(responses={404: "No such user", 409: "Would leave no active admin"})
def update_user(user_id: int, json_data: dict[str, Any]) -> User:
    """Change a user's role, or disable (``active: false``) or re-enable them."""
    with context.writing() as session:
        user = session.get(User, user_id)
        if user is None:
            raise APIError(404, "not_found", f"no user {user_id}")
        role = json_data.get("role", user.role)
        active = json_data.get("active", user.active)
        if user.role == Role.ADMIN.value and (role != Role.ADMIN.value or not active):
            others = session.scalar(
                select(func.count())
                .select_from(User)
                .where(User.role == Role.ADMIN.value, User.active.is_(True), User.id != user.id)
            )
            if not others:
                raise APIError(409, "conflict", "this would leave no active admin")
        changes = {
            key: value
            for key, value in (("role", role), ("active", active))
            if getattr(user, key) != value
        }
        user.role, user.active = role, active
        session.add(
            AuditEvent(
                actor=the_user().username,
                action="user.update",
                target=user.username,
                details=changes,
            )
        )
        return user
