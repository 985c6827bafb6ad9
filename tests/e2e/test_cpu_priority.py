"""``lungnode serve``: the model's compute threads yield the CPU to intake
(``pipeline.cpu_priority``).

TensorFlow makes its thread pools the first time the model runs, on the warm-up
thread, which lowered its own priority first: the pools inherit it. The node as
a user runs it (a subprocess, the relative ``storage/``), cold.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from lungnode.pipeline.cpu_priority import MODEL_NICENESS
from tests.conftest import unavailable
from tests.dicom.helpers import wait_until
from tests.serve import ServedNode


def _threads(pid: int) -> dict[str, list[int]]:
    """Thread name -> nice values of process ``pid``'s threads (Linux /proc)."""
    found: dict[str, list[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        nice = int(stat[stat.rindex(")") + 2 :].split()[16])  # field 19 of proc(5)
        found.setdefault(name, []).append(nice)
    return found


def test_tensorflow_s_threads_run_below_the_node_s_priority(
    serve_node: Callable[..., ServedNode],
) -> None:
    if not sys.platform.startswith("linux"):
        unavailable("a per-thread nice value is Linux's")
    server = serve_node()
    server.start()
    warmed = wait_until(lambda: "ready (warmed in" in server.log_text(), timeout=120)
    assert warmed, server.log_text()
    threads = _threads(server.pid)
    main = int(Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    pools = {name: nices for name, nices in threads.items() if name.startswith("tf_")}
    assert pools, f"no TensorFlow thread found: {sorted(threads)}"
    expected = min(19, main + MODEL_NICENESS)
    assert all(nice == expected for nices in pools.values() for nice in nices), pools
    # The rest of the node keeps its priority: its service threads (HTTP, outbox,
    # completion timer, jobs, ...) are many more than the few the model made.
    at_base = [nice for name, nices in threads.items() for nice in nices if nice == main]
    assert len(at_base) >= 5, threads
