"""Latency work that must not change a result: slices scored while they arrive, and a
series analysed and rendered while its grace runs (``pipeline.prescore``,
``SeriesJob.prepare``).

A prepared result is used only when the job's inputs are exactly what was prepared;
a late instance makes the job analyse afresh, with every instance.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from pydicom import Dataset
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Job, Prediction, Series
from tests.dicom.helpers import finished_job, store_all
from tests.support.synthetic import make_ct_series

SLICES = 24


def _series(slices: int = SLICES) -> list[Dataset]:
    # No declared count: the series completes by the release-and-grace rule.
    return make_ct_series(slices, rows=128, columns=128, declared_count=False, seed=5)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _ready(node: Node) -> Node:
    assert node.model is not None
    node.model.bundle(timeout=300)
    return node


@pytest.mark.slow
def test_a_released_series_is_prescored_and_prepared_before_its_grace_ends(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    settings = make_settings(model="lung-ct-demo", series_grace_seconds=4.0)
    node = _ready(start_node(settings, analyse=True, serve_http=False))
    assert node.prescorer is not None and node.preparations is not None
    datasets = _series()
    assert store_all(node.scp.port, datasets) == [0] * SLICES
    job = finished_job(node)
    assert job.state == "done" and job.details is not None
    assert job.details["prepared"] is True
    assert job.instance_count == SLICES
    assert node.prescorer.scored == SLICES
    with node.sessions() as session:
        prediction = session.scalars(select(Prediction)).one()
        series = session.scalars(select(Series)).one()
    assert series.completion_rule == "association_released"
    assert prediction.prediction_class and len(job.details["outputs"]) >= 5
    # The job took what was prepared and released it: nothing is held after.
    assert node.series_job is not None
    assert not node.series_job.is_prepared(str(datasets[0].SeriesInstanceUID))


@pytest.mark.slow
def test_a_late_instance_makes_the_job_analyse_afresh(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    # The test prepares and completes the series itself, around a late instance.
    settings = make_settings(
        model="lung-ct-demo", series_grace_seconds=600.0, prepare_during_grace=False
    )
    node = _ready(start_node(settings, analyse=True, serve_http=False))
    assert node.series_job is not None and node.preparations is None
    datasets = _series(SLICES + 1)
    uid = str(datasets[0].SeriesInstanceUID)
    assert store_all(node.scp.port, datasets[:SLICES]) == [0] * SLICES
    with node.sessions() as session:
        series_id = session.scalars(select(Series.id)).one()
    assert node.series_job.prepare(series_id)
    assert node.series_job.is_prepared(uid)

    assert store_all(node.scp.port, datasets[SLICES:]) == [0]  # late, within the grace
    job_id = node.repo.complete_series(series_id, "quiet_timer", "completed by the test")
    assert job_id is not None
    node.jobs.submit(job_id)
    job = finished_job(node)
    assert job.state == "done" and job.details is not None
    assert job.instance_count == SLICES + 1
    assert job.details["prepared"] is False  # 24 files were prepared, 25 came
    assert not node.series_job.is_prepared(uid)
    with node.sessions() as session:
        assert len(session.scalars(select(Job)).all()) == 1
        prediction = session.scalars(select(Prediction)).one()
    assert prediction.prediction_class
