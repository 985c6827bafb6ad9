"""Reliability drills (docs/reliability.md): a short variant in every test run, a long
one by flag.

``LUNGNODE_DRILLS=long`` (what ``make drills`` sets) runs each drill at full size;
otherwise each runs a scaled-down variant that still asserts the same outcomes.
Every drill writes its figures as a Markdown table to ``LUNGNODE_DRILL_REPORTS``
(default ``build/drills/`` under the repository root), from which
``docs/reliability.md`` quotes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("LUNGNODE_DRILLS", "").strip().lower() == "long"


@dataclass(frozen=True)
class Drill:
    """The size a drill runs at, and where it writes its report."""

    long: bool
    reports: Path

    def size(self, short: int, long: int) -> int:
        """``short`` in a test run, ``long`` under ``LUNGNODE_DRILLS=long``."""
        return long if self.long else short

    def seconds(self, short: float, long: float) -> float:
        return long if self.long else short

    def report(self, name: str, markdown: str) -> Path:
        """Write one drill's figures (Markdown) as ``<reports>/<name>.md``."""
        self.reports.mkdir(parents=True, exist_ok=True)
        path = self.reports / f"{name}.md"
        variant = "long" if self.long else "short"
        path.write_text(f"<!-- {name}, {variant} variant -->\n{markdown.rstrip()}\n")
        return path


@pytest.fixture(scope="session")
def drill() -> Drill:
    reports = Path(os.environ.get("LUNGNODE_DRILL_REPORTS", ROOT / "build" / "drills"))
    return Drill(long=LONG, reports=reports)
