"""A fault of the node is not a finding about the series.

A ValueError from numpy inside the analysis (as a bug would raise), or a
missing stored file, fails the *attempt*: nothing is written or sent, and
the job runs again after a back-off, until it is ``failed`` with the reason.
Only the series' own faults (too few slices: ``test_not_analysed``; pixels
that cannot be decoded: here) are answered "not analysed".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import RLELossless
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Delivery, Instance, Job, Prediction
from lungnode.pipeline.jobs import JobRetryPolicy, run_job
from lungnode.pipeline.series_job import make_series_job
from tests.dicom.helpers import finished_job, store_all, wait_until
from tests.support.synthetic import make_ct_series

#: Small back-offs, so three attempts take about a second.
FAST_RETRY: dict[str, Any] = {
    "model": "lung-ct-demo",
    # The job's own analysis is what fails here: a released series is not prepared
    # during its grace (that path, and a late instance, are test_prepared_results').
    "prepare_during_grace": False,
    "min_series_slices": 5,
    "job_max_attempts": 3,
    "job_retry_base_seconds": 0.3,
    "job_retry_cap_seconds": 0.6,
    "job_check_interval": 0.05,
}


@pytest.fixture
def broken_analysis(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[float]]:
    """Make the next ``failures`` analyses of a job fail with numpy's own ValueError, after
    the series was decoded and scored; returns the moments the analysis concluded or failed.

    Only analyses on a job worker's thread count: the model's warm-up at start runs the
    same analysis, and a fault there is another test's concern."""

    def _break(failures: int) -> list[float]:
        from lungnode.pipeline import analyze

        real = analyze.conclude
        calls: list[float] = []

        def conclude(*args: Any, **kwargs: Any) -> Any:
            if not threading.current_thread().name.startswith("job-worker"):
                return real(*args, **kwargs)
            calls.append(time.monotonic())
            if len(calls) <= failures:
                np.broadcast_shapes((2, 3), (4,))  # ValueError: shape mismatch
            return real(*args, **kwargs)

        monkeypatch.setattr(analyze, "conclude", conclude)
        return calls

    return _break


def _outputs(node: Node) -> tuple[list[Prediction], list[Delivery], list[Path]]:
    with node.sessions() as session:
        predictions = list(session.scalars(select(Prediction)))
        deliveries = list(session.scalars(select(Delivery)))
    storage = node.settings.storage_dir
    files = [p for d in ("results", "reports") for p in (storage / d).rglob("*") if p.is_file()]
    return predictions, deliveries, files


@pytest.mark.slow
def test_an_internal_error_sends_nothing_and_the_job_fails_after_its_attempts(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    broken_analysis: Callable[[int], list[float]],
) -> None:
    calls = broken_analysis(99)
    node = start_node(make_settings(**FAST_RETRY), analyse=True, serve_http=False)
    assert store_all(node.scp.port, make_ct_series(6, rows=64, columns=64)) == [0] * 6
    job = finished_job(node)
    # Before: "done", with a "Not analysed, because shape mismatch ..." SR and PDF sent.
    assert job.state == "failed", (job.state, job.details)
    assert job.attempts == 3 and len(calls) == 3
    assert job.last_error is not None and job.last_error.startswith("ValueError: shape mismatch")
    assert job.reason == f"gave up after 3 attempt(s); last error: {job.last_error}"
    # Each retry waited out its back-off (0.3 s, then 0.6 s).
    assert calls[1] - calls[0] >= 0.3 and calls[2] - calls[1] >= 0.6, calls
    predictions, deliveries, files = _outputs(node)
    assert predictions == [] and deliveries == [] and files == []


@pytest.mark.slow
def test_a_job_that_fails_once_then_succeeds_is_done_with_one_set_of_results(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    broken_analysis: Callable[[int], list[float]],
) -> None:
    calls = broken_analysis(1)
    node = start_node(make_settings(**FAST_RETRY), analyse=True, serve_http=False)
    assert store_all(node.scp.port, make_ct_series(6, rows=64, columns=64)) == [0] * 6
    job = finished_job(node)
    assert job.state == "done", job.reason
    assert job.attempts == 2 and len(calls) == 2 and job.next_attempt_at is None
    assert job.details is not None and job.details["analysed"] is True
    assert job.last_error is not None and "shape mismatch" in job.last_error  # kept as history
    predictions, deliveries, files = _outputs(node)
    assert len(predictions) == 1 and predictions[0].prediction_class
    modalities = sorted(str(_read(node, d.path).Modality) for d in deliveries)
    assert modalities.count("DOC") == 1 and modalities.count("SR") == 1 and len(modalities) > 2
    assert len({d.sop_instance_uid for d in deliveries}) == len(deliveries)
    assert {d.destination for d in deliveries} == {"scu"}
    assert len([f for f in files if f.suffix == ".dcm"]) == len(deliveries)


def _read(node: Node, stored: str) -> Dataset:
    return dcmread(node.settings.resolve_stored(stored))


def _undecodable(series: list[Dataset]) -> list[Dataset]:
    """RLE frames whose second segment starts past the end of the data (PS3.5 G.5)."""
    for ds in series:
        data = bytearray(ds.PixelData)
        header = 8 + int.from_bytes(data[4:8], "little") + 8  # after the Basic Offset Table
        data[header + 8 : header + 12] = (0xFFFFF).to_bytes(4, "little")
        ds.PixelData = bytes(data)
    return series


@pytest.mark.slow
def test_pixels_that_cannot_be_decoded_are_answered_not_analysed(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    node = start_node(make_settings(**FAST_RETRY), analyse=True, serve_http=False)
    series = _undecodable(make_ct_series(6, rows=64, columns=64, transfer_syntax=RLELossless))
    assert store_all(node.scp.port, series) == [0] * 6
    job = finished_job(node)
    assert (job.state, job.attempts) == ("done", 1), job.reason
    assert job.details is not None and job.details["analysed"] is False
    assert "cannot decode pixel data" in job.details["not_analysed_reason"]
    predictions, deliveries, _ = _outputs(node)
    assert len(predictions) == 1 and predictions[0].prediction_class is None
    assert sorted(str(_read(node, d.path).Modality) for d in deliveries) == ["DOC", "SR"]


def test_a_missing_stored_file_is_a_storage_fault_not_a_finding(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    """A file the node acknowledged and then lost (a shared volume not mounted) is
    retried; before, it was read as "not a readable DICOM file" and answered."""
    settings = make_settings(**FAST_RETRY, workers=0)  # the job stays queued
    node = start_node(settings, analyse=True, serve_http=False)
    assert store_all(node.scp.port, make_ct_series(6, rows=64, columns=64)) == [0] * 6
    assert wait_until(lambda: node.jobs.repo.queued_job_ids() != [], timeout=30)
    (job_id,) = node.jobs.repo.queued_job_ids()
    with node.sessions() as session:
        paths = list(session.scalars(select(Instance.path).order_by(Instance.instance_number)))
    settings.resolve_stored(paths[-1]).unlink()
    handler = make_series_job(settings, node.sessions)
    assert run_job(node.jobs.repo, handler, job_id, JobRetryPolicy(max_attempts=3, base_seconds=60))
    with node.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.next_attempt_at is not None) == ("queued", 1, True)
        assert job.last_error == "FileNotFoundError: 1 stored instance file(s) missing"
    predictions, deliveries, files = _outputs(node)
    assert predictions == [] and deliveries == [] and files == []
