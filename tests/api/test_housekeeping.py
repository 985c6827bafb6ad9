"""The periodic clean-up of old uploads (original plan 4.3) runs inside the node."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from lungnode.app.node import Node
from lungnode.config import Settings


def test_serve_cleans_old_uploads_at_start(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    settings = make_settings(upload_retention_hours=1.0)
    uploads = settings.storage_dir / "uploads"
    uploads.mkdir(parents=True)
    old, fresh = uploads / "old.png", uploads / "fresh.png"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    start_node(settings, serve_http=False)
    deadline = time.monotonic() + 10
    while old.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not old.exists() and fresh.exists()
