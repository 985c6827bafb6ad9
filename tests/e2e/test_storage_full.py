"""A disk that fills while a job runs, in the embedded node with its SQLite database
on that same disk: the job's outputs cannot be written, and neither can the job's own
row. The job waits (it is never ``failed`` for it) and finishes by itself once space
returns, without a restart. With the analysis and its figures:
``tests/drills/test_disk_full.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Job
from lungnode.dicom.intake import write_all_atomically
from tests.dicom.helpers import store_all, wait_until
from tests.support.small_disk import fill, small_disk
from tests.support.synthetic import make_ct_series


def _job(node: Node) -> Job | None:
    with node.sessions() as session:
        return session.scalars(select(Job)).first()


@pytest.mark.slow
def test_a_job_whose_disk_fills_while_it_runs_waits_and_then_finishes(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with small_disk(tmp_path / "disk", 8) as disk:
        storage = disk / "storage"
        filler = disk / "filler"
        calls: list[float] = []

        def handler(job_id: int) -> dict[str, Any]:
            calls.append(time.monotonic())
            if len(calls) == 1:
                fill(filler)  # the disk fills while the job runs
            write_all_atomically([(storage / "out" / f"{job_id}.bin", b"x" * 2**20)])
            return {"ok": True}

        settings = make_settings(
            storage_dir=storage,
            job_max_attempts=1,
            job_storage_wait_seconds=0.2,
            job_check_interval=0.05,
        )
        node = start_node(settings, job_handler=handler, serve_http=False)
        assert store_all(node.scp.port, make_ct_series(6, rows=64, columns=64)) == [0] * 6
        assert wait_until(lambda: "waits for storage space" in caplog.text, timeout=30)
        time.sleep(1.0)  # held full: more than job_max_attempts tries
        job = _job(node)
        assert job is not None and job.state in ("queued", "running"), job
        assert job.attempts <= 1 and list(storage.rglob("*.part")) == []
        assert not (storage / "out").exists() or list((storage / "out").iterdir()) == []

        filler.unlink()
        assert wait_until(lambda: getattr(_job(node), "state", None) == "done", timeout=30)
        job = _job(node)
        assert job is not None and (job.attempts, job.details) == (1, {"ok": True})
        assert (storage / "out" / f"{job.id}.bin").stat().st_size == 2**20
        node.stop()
