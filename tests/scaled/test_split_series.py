"""Several receiving nodes: one series arrives over two ``lungnode scp`` processes
(as behind a TCP load balancer) and is completed once, from the database, with
one job and one broker message; a late instance at the other process reopens
it and queues version 2."""

from __future__ import annotations

import threading

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.dicom.helpers import associate
from tests.scaled.conftest import Cluster, WaitFor
from tests.support.synthetic import make_ct_series

pytestmark = [pytest.mark.scaled, pytest.mark.slow]

N_SLICES = 24


def _send_alternately(ports: tuple[int, int], datasets: list[Dataset]) -> list[int]:
    """Two associations open at once, one per scp; slices go to each in turn."""
    contexts = [(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)]
    associations = [associate(port, contexts) for port in ports]
    assert all(assoc.is_established for assoc in associations)
    statuses = []
    try:
        for k, ds in enumerate(datasets):
            statuses.append(int(associations[k % 2].send_c_store(ds).Status))
    finally:
        for assoc in associations:
            assoc.release()
    return statuses


def _jobs(cluster: Cluster, series_uid: str) -> list[tuple[object, ...]]:
    return cluster.query(
        "SELECT job.version, job.state, job.instance_count FROM job "
        "JOIN series ON series.id = job.series_id WHERE series.series_instance_uid = :uid "
        "ORDER BY job.version",
        uid=series_uid,
    )


@pytest.mark.parametrize("declared", [True, False], ids=["declared-count", "release-and-grace"])
def test_a_series_split_over_two_scps_completes_once(
    cluster: Cluster, wait_for: WaitFor, declared: bool
) -> None:
    first = cluster.start("scp")
    second = cluster.start("scp")
    assert first.dicom_port is not None and second.dicom_port is not None
    datasets = make_ct_series(N_SLICES + 1, rows=64, columns=64, declared_count=declared)
    late = datasets.pop()
    if declared:
        for ds in datasets:
            ds.ImagesInAcquisition = N_SLICES
    series_uid = str(datasets[0].SeriesInstanceUID)

    assert _send_alternately((first.dicom_port, second.dicom_port), datasets) == [0] * N_SLICES
    wait_for(lambda: bool(_jobs(cluster, series_uid)), 20, "the series to complete")
    # Both completion timers keep looking: a second completion would show up now.
    threading.Event().wait(2.0)
    assert _jobs(cluster, series_uid) == [(1, "queued", N_SLICES)], cluster.logs()
    counts = cluster.query(
        "SELECT COUNT(DISTINCT instance.association_id), COUNT(*) FROM instance "
        "JOIN series ON series.id = instance.series_id WHERE series.series_instance_uid = :uid",
        uid=series_uid,
    )
    assert counts == [(2, N_SLICES)]
    completions = [
        line
        for role in (first, second)
        for line in role.log_text().splitlines()
        if f"series {series_uid} complete" in line
    ]
    assert len(completions) == 1, completions
    # One message for the one job: no worker runs here, so it waits in the queue.
    assert cluster.broker.llen("lungnode.jobs") == 1

    # The series was completed by one process; a late instance reaches the other.
    completed_by = first if completions[0] in first.log_text() else second
    other = second if completed_by is first else first
    assert other.dicom_port is not None
    assoc = associate(other.dicom_port, [(str(late.SOPClassUID), ExplicitVRLittleEndian)])
    assert assoc.is_established
    try:
        assert assoc.send_c_store(late).Status == 0x0000
    finally:
        assoc.release()
    wait_for(lambda: len(_jobs(cluster, series_uid)) == 2, 20, "version 2 of the analysis")
    threading.Event().wait(1.0)
    assert _jobs(cluster, series_uid) == [
        (1, "queued", N_SLICES),
        (2, "queued", N_SLICES + 1),
    ], cluster.logs()
    assert cluster.broker.llen("lungnode.jobs") == 2
