"""A node serving HTTP, its users by role, and STOW-RS requests to it over real sockets."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Role, User
from lungnode.passwords import hash_password
from tests.dicomweb.stow_client import content_type, multipart_body
from tests.support.synthetic import dataset_bytes

ADMIN_PASSWORD = "admin-password-for-stow-tests"
PASSWORD = "user-password-for-stow-tests"


@dataclass
class StowNode:
    """A running node (SCP and HTTP) with a user of every role (password ``PASSWORD``)."""

    node: Node
    settings: Settings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.node.http_port}"

    def add_user(self, username: str, role: Role) -> None:
        with self.node.sessions.begin() as session:
            session.add(
                User(username=username, role=role.value, password_hash=hash_password(PASSWORD))
            )

    def token(self, username: str) -> str:
        password = ADMIN_PASSWORD if username == "admin" else PASSWORD
        response = requests.post(
            f"{self.url}/api/v1/auth/login",
            json={"username": username, "password": password},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def stow(
        self,
        payloads: Sequence[bytes] | None = None,
        *,
        body: bytes | Iterable[bytes] | None = None,
        study: str | None = None,
        auth: Any = ("sender", PASSWORD),
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """POST to /dicomweb/studies[/study]; HTTP Basic as ``sender`` unless told."""
        if body is None:
            body = multipart_body(payloads or [])
        url = f"{self.url}/dicomweb/studies" + (f"/{study}" if study else "")
        sent = {"Content-Type": content_type(), "Accept": "application/dicom+json"}
        if isinstance(auth, str):
            sent["Authorization"] = f"Bearer {auth}"
            auth = None
        sent.update(headers or {})
        return requests.post(url, data=body, headers=sent, auth=auth, timeout=120)

    def leftovers(self) -> list[Path]:
        """Temporary files anywhere in the storage: spooled parts, half-written instances."""
        storage = self.settings.storage_dir
        spooled = [p for p in (storage / "tmp").rglob("*") if p.is_file()]
        return sorted(set(storage.rglob("*.part")) | set(spooled))


@pytest.fixture
def make_stow_node(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> Callable[..., StowNode]:
    def _make(analyse: bool = False, **overrides: Any) -> StowNode:
        settings = make_settings(admin_password=ADMIN_PASSWORD, **overrides)
        node = start_node(settings, analyse=analyse, serve_http=True)
        served = StowNode(node, settings)
        for role in (Role.SENDER, Role.RADIOLOGIST, Role.VIEWER):
            served.add_user(role.value, role)
        return served

    return _make


@pytest.fixture
def stow_node(make_stow_node: Callable[..., StowNode]) -> StowNode:
    return make_stow_node()


def encoded(datasets: Iterable[Any]) -> list[bytes]:
    """Each data set as a DICOM file (PS3.10), as a STOW-RS part carries it."""
    return [dataset_bytes(ds) for ds in datasets]


def instance_rows(node: Node) -> list[tuple[str, int | None]]:
    from lungnode.db.models import Instance

    with node.sessions() as session:
        return [
            (row.sop_instance_uid, row.association_id)
            for row in session.scalars(select(Instance).order_by(Instance.id))
        ]
