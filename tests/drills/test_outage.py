"""PACS outage drill: Orthanc is down while series are analysed, then comes back.

A ``lungnode serve`` subprocess sends every result to two destinations: Orthanc
(``orthanc``), and Orthanc's port under an AE title Orthanc does not answer to
(``refusing``). With the model warm, Orthanc stops; the series are sent to the node
and analysed; the drill watches the outbox through the API (``GET
/api/v1/deliveries``, as an admin) for the outage's length, then starts Orthanc
again. It asserts:

- the back-off is visible: each delivery's attempts grow during the outage, with
  its next attempt and the last error ("cannot connect") in the API, and the
  intervals between one delivery's attempts (the API's ``updated_at`` at each
  attempt) grow;
- afterwards everything for ``orthanc`` is delivered: every result object is in
  Orthanc, in the study of its source series, once;
- the permanent refusal is dead-lettered: once Orthanc answers again, it rejects
  the association for ``refusing`` permanently (called AE title not recognised),
  and each of those deliveries is ``dead`` at once (fewer attempts than the
  limit), listed by ``GET /deliveries?state=dead`` with the reason.

20 s of outage and 2 series in a test run; 3 minutes and 4 series with
``LUNGNODE_DRILLS=long``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SENDER_AE, Databases, require_tool
from tests.dicom.helpers import free_port, store_all, wait_until
from tests.drills.conftest import LONG, Drill
from tests.drills.results_node import kinds_text, series_facts
from tests.pacs import ORTHANC_AE, Orthanc
from tests.serve import ServedNode
from tests.support.synthetic import make_ct_series

N_SLICES = 12
MAX_ATTEMPTS = 40


@dataclass(frozen=True)
class Seen:
    """One delivery as the API showed it at one moment."""

    at: float  # seconds since the outage began
    attempts: int
    updated_at: datetime
    next_attempt_at: datetime
    last_error: str | None


def _deliveries(node: ServedNode, state: str | None = None) -> list[dict[str, Any]]:
    query = "/deliveries?per_page=100" + (f"&state={state}" if state else "")
    page = node.api(query)
    items: list[dict[str, Any]] = page["items"]
    assert page["total"] == len(items), "more deliveries than one page"
    return items


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.drill
@pytest.mark.slow
@pytest.mark.timeout(1200 if LONG else 600)
@pytest.mark.backend_neutral(
    "the back-off and dead letters are the outbox's, whose rows tests/dicom/test_outbox.py "
    "checks on both backends"
)
def test_outage_drill(
    drill: Drill,
    serve_node: Callable[..., ServedNode],
    databases: Databases,
    tmp_path: Path,
) -> None:
    outage_seconds = drill.seconds(20.0, 180.0)
    n_series = drill.size(2, 4)
    base, cap = (1.0, 8.0) if not drill.long else (2.0, 60.0)
    orthanc = Orthanc(require_tool("Orthanc"), tmp_path / "orthanc", {}, dicom_port=free_port())
    port = orthanc.dicom_port
    node = serve_node(
        storage=tmp_path / "storage",
        databases=databases,
        peers=(
            f"scu={SENDER_AE}@127.0.0.1:{free_port()},"
            f"orthanc={ORTHANC_AE}@127.0.0.1:{port},"
            f"refusing=NOTORTHANC@127.0.0.1:{port}"
        ),
        result_destinations="orthanc,refusing",
        ingest_processes="1",
        delivery_retry_base_seconds=str(base),
        delivery_retry_cap_seconds=str(cap),
        delivery_max_attempts=str(MAX_ATTEMPTS),
        delivery_check_interval="0.2",
        delivery_timeout="10",
    )
    orthanc.start()
    history: dict[int, list[Seen]] = {}
    try:
        node.start()
        node.wait_model_ready()

        # The outage: Orthanc stops, and the series arrive.
        orthanc.stop()
        down = time.monotonic()
        series = [make_ct_series(N_SLICES, rows=128, columns=128, seed=k) for k in range(n_series)]
        for datasets in series:
            assert store_all(node.dicom_port, datasets) == [0] * N_SLICES
        while time.monotonic() - down < outage_seconds:
            now = time.monotonic() - down
            for item in _deliveries(node):
                seen = history.setdefault(item["id"], [])
                if not seen or seen[-1].attempts != item["attempts"]:
                    seen.append(
                        Seen(
                            now,
                            item["attempts"],
                            _time(item["updated_at"]),
                            _time(item["next_attempt_at"]),
                            item["last_error"],
                        )
                    )
            time.sleep(0.25)
        during = {item["id"]: item for item in _deliveries(node)}

        # Orthanc is back.
        orthanc.start()
        up = time.monotonic()
        settled = wait_until(
            lambda: (
                {(d["destination"], d["state"]) for d in _deliveries(node)}
                == {("orthanc", "done"), ("refusing", "dead")}
            ),
            timeout=cap + 60,
            step=0.25,
        )
        recovery = time.monotonic() - up
        assert settled, node.log_text()
        after = _deliveries(node)
        dead = _deliveries(node, "dead")
        facts = [
            series_facts(node, str(ds[0].StudyInstanceUID), str(ds[0].SeriesInstanceUID), orthanc)
            for ds in series
        ]
    finally:
        node.close()
        orthanc.stop()

    # During the outage: every delivery was tried again and again, and the API said so.
    assert len(during) == len(after) and during
    for item in during.values():
        assert item["state"] == "pending", item
        assert item["attempts"] >= 3, item
        assert "cannot connect" in (item["last_error"] or ""), item
    # One delivery's attempts, as the API showed them: the intervals grow.
    first = min(history)
    attempts = [seen for seen in history[first] if seen.attempts > 0]
    # Between attempts n and n+1 only (a poll may miss one).
    intervals = [
        (b.updated_at - a.updated_at).total_seconds()
        for a, b in zip(attempts, attempts[1:], strict=False)
        if b.attempts == a.attempts + 1
    ]
    assert len(intervals) >= 2, attempts
    for earlier, later in zip(intervals, intervals[1:], strict=False):
        # Equal jitter: each delay is at least the previous one's whole step (until
        # the cap); the sender looks every 0.2 s.
        assert later >= earlier - 0.5 or earlier >= cap / 2, intervals
    assert intervals[-1] >= 2 * intervals[0], intervals

    # After: everything for Orthanc is there, in its study, once; the refused are dead.
    for fact in facts:
        sent = {uid for state, uid, _ in fact.deliveries if state == "done"}
        assert sent and sent == set(fact.in_orthanc), fact
        assert fact.delivered_kinds()["PDF"] == 1 and fact.delivered_kinds()["SR"] == 1
    refused = [d for d in after if d["destination"] == "refusing"]
    assert {d["id"] for d in dead} == {d["id"] for d in refused}
    for item in dead:
        assert "Rejected Permanent" in item["last_error"], item
        assert "Called AE title not recognised" in item["last_error"], item
        # Dead because refused, not because the attempts ran out.
        assert during[item["id"]]["attempts"] < item["attempts"] < MAX_ATTEMPTS, item

    rows = [
        "| attempt | seen at s (outage) | attempt at (API `updated_at`) | interval s "
        "| next attempt in s | last error |",
        "|---|---|---|---|---|---|",
    ]
    previous: Seen | None = None
    for seen in attempts:
        interval = "–"
        if previous is not None and seen.attempts == previous.attempts + 1:
            interval = f"{(seen.updated_at - previous.updated_at).total_seconds():.2f}"
        wait = (seen.next_attempt_at - seen.updated_at).total_seconds()
        at = seen.updated_at.time().isoformat("milliseconds")
        rows.append(
            f"| {seen.attempts} | {seen.at:.1f} | {at} | {interval} | {wait:.2f} "
            f"| {seen.last_error} |"
        )
        previous = seen
    delivered: Counter[str] = Counter()
    for fact in facts:
        delivered += fact.delivered_kinds()
    summary = "\n".join(
        [
            f"Orthanc down {outage_seconds:.0f} s while {n_series} series of {N_SLICES} slices "
            f"were received and analysed; back-off base {base:g} s, cap {cap:g} s (equal "
            f"jitter); the node looks for due deliveries every 0.2 s.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| deliveries (2 destinations) | {len(after)} |",
            f"| attempts per delivery at the end of the outage | "
            f"{min(d['attempts'] for d in during.values())}–"
            f"{max(d['attempts'] for d in during.values())} |",
            f"| all delivered to Orthanc, after it came back | {recovery:.1f} s |",
            f"| objects in Orthanc, in their source studies | {delivered.total()} "
            f"({kinds_text(delivered)}) |",
            f"| dead letters (`refusing`, rejected-permanent) | {len(dead)}, each after "
            f"{min(d['attempts'] for d in dead)}–{max(d['attempts'] for d in dead)} attempts |",
            "",
            f"One delivery (id {first}) as `GET /api/v1/deliveries` showed it:",
            "",
            *rows,
        ]
    )
    drill.report("outage", summary)
