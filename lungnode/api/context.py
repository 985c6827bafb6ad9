"""What the API may ask of the node it runs in."""

from __future__ import annotations

from typing import Any, Protocol, cast

from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from lungnode.config import Settings


class NodeStatus(Protocol):
    """Live state of the in-process node (absent when the API runs alone)."""

    @property
    def scp_listening(self) -> bool: ...


def _extension() -> dict[str, Any]:
    return cast(dict[str, Any], current_app.extensions["lungnode"])


def settings() -> Settings:
    return cast(Settings, _extension()["settings"])


def engine() -> Engine:
    return cast(Engine, _extension()["engine"])


def sessions() -> sessionmaker[Session]:
    return cast(sessionmaker[Session], _extension()["sessions"])


def node_status() -> NodeStatus | None:
    return cast("NodeStatus | None", _extension()["node_status"])
