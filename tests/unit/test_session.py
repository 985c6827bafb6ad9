"""The session factory of a process (``db.session.make_session_factory``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_CHECK = """
from lungnode.db.session import make_engine, make_session_factory
from lungnode.db.models import Association, Instance
before = Instance.__mapper__.configured
make_session_factory(make_engine("sqlite://"))
print(before, Association.__mapper__.configured, Instance.__mapper__.configured)
"""


def test_a_new_process_s_mappers_are_configured_with_its_session_factory() -> None:
    """Not by the first row a receiving thread writes through the ORM (its first
    association's first instance would wait for it)."""
    result = subprocess.run(
        [sys.executable, "-c", _CHECK],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True"]
