"""``lungnode serve`` leaves only its window of received instances in the page cache
(``intake_page_cache_mb``, ``dicom.page_cache``), in the node's own process and in
an ingest worker. The node as a user runs it: a subprocess, the relative
``storage/``, cold; DCMTK's storescu sends.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SENDER_AE, require_tool
from tests.serve import ServedNode
from tests.support.page_cache import require_dropping, resident_pages
from tests.support.synthetic import make_ct_series, write_series


@pytest.mark.parametrize("ingest_processes", ["1", "2"], ids=["node", "worker"])
def test_only_the_instances_received_last_stay_in_the_page_cache(
    serve_node: Callable[..., ServedNode], tmp_path: Path, ingest_processes: str
) -> None:
    storescu = require_tool("storescu")
    require_dropping(tmp_path)
    # 513 KB instances and a window of 1 MiB: the last one stays, the others go.
    # Nothing else reads them here: no pre-scoring, and no worker runs the job.
    server = serve_node(
        intake_page_cache_mb="1",
        ingest_processes=ingest_processes,
        prescore_slices="false",
        workers="0",
    )
    server.start()
    outgoing = tmp_path / "outgoing"
    write_series(make_ct_series(6, declared_count=False), outgoing)
    sent = subprocess.run(
        [storescu, "-aet", SENDER_AE, "-aec", "LUNGNODE"]
        + ["127.0.0.1", str(server.dicom_port), "+sd", str(outgoing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    rows = server.query("SELECT path FROM instance ORDER BY id")
    stored = [server.workdir / "storage" / path for (path,) in rows]
    assert len(stored) == 6 and all(path.is_file() for path in stored), stored
    cached = [resident_pages(path) for path in stored]
    assert all(pages_in == 0 for pages_in, _pages in cached[:5]), cached
    assert cached[5][0] == cached[5][1], cached
