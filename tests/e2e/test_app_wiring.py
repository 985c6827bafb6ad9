"""The wiring layer joins the roles of one process: what the series job measures, the
API of the same node serves."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

import pytest

from lungnode.app.node import Node
from lungnode.config import Settings
from tests.dicom.helpers import finished_job, store_all
from tests.support.synthetic import make_ct_series


def _stage_count(text: str, stage: str) -> float:
    prefix = f'lungnode_stage_seconds_count{{stage="{stage}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix) :]) if lines else 0.0


@pytest.mark.slow
def test_series_job_timings_reach_the_nodes_metrics(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    node = start_node(make_settings(model="lung-ct-demo"), analyse=True)
    url = f"http://127.0.0.1:{node.http_port}/api/v1/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        before = _stage_count(response.read().decode(), "aggregate")
    assert store_all(node.scp.port, make_ct_series(8, rows=64, columns=64)) == [0] * 8
    job = finished_job(node)
    assert job.state == "done", job.reason
    with urllib.request.urlopen(url, timeout=10) as response:
        after = _stage_count(response.read().decode(), "aggregate")
    assert after == before + 1
