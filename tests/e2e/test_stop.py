"""``lungnode serve`` stopped by a signal: clean, bounded, and nothing half-done.

The node runs as a user runs it: a subprocess in its own working directory,
with the relative ``storage/`` of the defaults. A service manager stops a
whole process group (systemd's control group, a terminal's job), so the
ingest workers get the same SIGTERM as the node: that must not read as a
fault. A stop while a job runs takes at most ``stop_timeout_seconds`` (plus
the rest of the stop); the job is then queued again and, after a restart,
completes exactly once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dicom.helpers import store_all, wait_until
from tests.serve import ServedNode
from tests.support.synthetic import make_ct_series


def _faults(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or " WARNING " in line]


@pytest.mark.parametrize("whole_group", [True, False], ids=["process-group", "node-only"])
def test_sigterm_with_two_ingest_processes_is_a_clean_stop(
    serve_node: Callable[..., ServedNode], whole_group: bool
) -> None:
    server = serve_node()
    server.start(ingest_processes="2", workers="0")
    assert wait_until(lambda: "receiving in 2 process(es)" in server.log_text(), timeout=30)
    # whole_group: what systemd, or a terminal's job control, does
    server.signal(signal.SIGTERM, whole_group=whole_group)
    assert server.wait(timeout=30) == 0, server.log_text()
    log = server.log_text()
    assert "stopped" in log.splitlines()[-1], log
    assert _faults(log) == [], log


@pytest.mark.slow
def test_a_stop_during_a_job_is_bounded_and_the_job_completes_once_after_restart(
    serve_node: Callable[..., ServedNode],
) -> None:
    # The default relative storage/ in the node's working directory.
    server = serve_node()
    bound = 1.0
    # Sent at once after the start, the series' job runs while the model still
    # warms (TensorFlow takes seconds to load): a job that cannot end in time.
    server.start(stop_timeout_seconds=str(bound), ingest_processes="1")
    datasets = make_ct_series(12, rows=128, columns=128)
    assert store_all(server.dicom_port, datasets) == [0] * 12
    running = wait_until(
        lambda: server.query("SELECT state FROM job") == [("running",)], timeout=30
    )
    assert running, server.log_text()
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.log_text()
    stop_seconds = time.monotonic() - started
    assert stop_seconds < bound + 4.0, f"stop took {stop_seconds:.1f} s:\n{server.log_text()}"
    log = server.log_text()
    assert "left queued for the next start" in log, log
    # Given up before recording: queued again, nothing recorded, nothing to send.
    assert server.query("SELECT state FROM job") == [("queued",)]
    assert server.query("SELECT COUNT(*) FROM prediction") == [(0,)]
    assert server.query("SELECT COUNT(*) FROM delivery") == [(0,)]

    server.start()
    done = wait_until(
        lambda: server.query("SELECT state FROM job") == [("done",)], timeout=120, step=0.2
    )
    assert done, server.log_text()
    assert server.query("SELECT COUNT(*) FROM prediction") == [(1,)]
    deliveries = server.query("SELECT sop_instance_uid FROM delivery")
    assert len(deliveries) >= 3 and len(set(deliveries)) == len(deliveries)  # SC, PDF, SR
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.log_text()


@pytest.mark.slow
def test_a_stop_leaves_no_autograph_files_behind(serve_node: Callable[..., ServedNode]) -> None:
    """TensorFlow's autograph writes a Python file for each function it converts (the
    warm-up converts the model's and Grad-CAM's) into the temporary folder, and removes
    them in an exit hook that the node's fast exit skipped: every stop left them."""
    server = serve_node()
    temporary = Path(server.env["TMPDIR"])  # the node's own (``tests.serve``)
    assert temporary.is_dir() and temporary.is_relative_to(server.workdir)
    server.start(ingest_processes="1")
    warmed = wait_until(lambda: "ready (warmed in" in server.log_text(), timeout=120)
    assert warmed, server.log_text()
    assert list(temporary.glob("__autograph_generated_file*.py")), "the warm-up wrote none"
    server.signal(signal.SIGTERM, whole_group=True)
    assert server.wait(timeout=30) == 0, server.log_text()
    assert list(temporary.glob("__autograph_generated_file*.py")) == []
