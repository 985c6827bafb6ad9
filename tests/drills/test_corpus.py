"""Bad-input corpus drill: every file of pydicom's test data, sent to a running node.

``lungnode serve`` runs as its own process, with the bundled model and a
results peer. Each file goes to it twice:

- over DIMSE: files grouped by folder, one association per group from
  pynetdicom's SCU proposing each file's SOP class and transfer syntax, the
  file sent as stored (its data set bytes unchanged, as a PACS forwards it);
- over HTTP: ``POST /api/v1/predict`` with the file, as an admin.

``tests/drills/corpus.py`` states from pydicom's reading of each file what the
node must answer (docs/conformance.md 2.4, docs/api.md); the drill asserts that
every answer is exactly that, that nothing answers 5xx, that the node logs no
error, that it stays up (C-ECHO and ``/health`` after every group), that every
instance it acknowledged is recorded, and that the CT series it stored are
analysed and their results delivered.

The corpus is pydicom's test files (176 files, 3 MB) and pydicom-data's (68 files,
56 MB). It is sent whole in both variants: most of the drill's minute is the
model's warm-up, which the sending overlaps; pydicom-data adds a few seconds.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt

from lungnode.db.models import DeliveryState, JobState, SeriesState
from tests.conftest import IN_CI, SENDER_AE, Databases, query
from tests.dicom.helpers import associate, close_dropped, free_port, wait_until
from tests.drills.conftest import Drill
from tests.drills.corpus import (
    NO_PIXEL_DATA,
    NOT_AN_IMAGE,
    NOT_SENDABLE,
    REFUSED,
    CorpusFile,
    Facts,
    corpus,
    dimse_status,
    expected_dimse,
    expected_upload,
    facts_of,
    pydicom_data_files,
    pydicom_test_files,
)
from tests.serve import ADMIN_PASSWORD, ServedNode

#: Files per association (and between two checks that the node is up).
BATCH = 40
#: A log line that shows an error or an exception escaping somewhere in the node.
FAULT_MARKERS = (" ERROR ", " CRITICAL ", "Traceback (most recent call last)", "Exception in ")


@dataclass
class Outcome:
    """What the node answered to one file over one route; ``detail`` only for the table."""

    answer: str
    detail: str = ""

    def cell(self) -> str:
        return f"{self.answer} ({self.detail})" if self.detail else self.answer


@dataclass
class ResultsPeer:
    """The PACS the node sends results back to: a storage SCP that keeps nothing."""

    port: int
    received: Counter[str]


@pytest.fixture
def results_peer() -> Iterator[ResultsPeer]:
    received: Counter[str] = Counter()

    def _store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPClassUID)] += 1
        return 0x0000

    ae = AE(ae_title=SENDER_AE)
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, _store)]
    )
    assert server is not None
    yield ResultsPeer(port, received)
    server.shutdown()


@pytest.fixture
def node(tmp_path: Path, databases: Databases, results_peer: ResultsPeer) -> Iterator[ServedNode]:
    server = ServedNode(
        tmp_path,
        storage=tmp_path / "storage",
        databases=databases,
        peers=f"pacs={SENDER_AE}@127.0.0.1:{results_peer.port}",
        # One client sends everything: the per-client limit would answer 429.
        rate_limit_default="100000/minute",
        series_quiet_seconds="2",
        delivery_check_interval="0.2",
        workers="1",
        ingest_processes="1",
    )
    server.start()
    yield server
    server.close()


def _batches(files: list[Facts]) -> list[list[Facts]]:
    """Files of one folder together (a series goes over one association), at most BATCH."""
    by_folder: dict[Path, list[Facts]] = {}
    for facts in files:
        by_folder.setdefault(facts.file.path.parent, []).append(facts)
    return [
        group[start : start + BATCH]
        for group in by_folder.values()
        for start in range(0, len(group), BATCH)
    ]


def send_over_dimse(port: int, batch: list[Facts]) -> dict[str, Outcome]:
    """One association proposing each sendable file's (SOP class, transfer syntax); each
    file sent as stored. What a file without the file meta to propose it gets is said."""
    outcomes = {
        f.file.name: Outcome(NOT_SENDABLE, f.why_not_sendable) for f in batch if not f.sendable
    }
    sendable = [f for f in batch if f.sendable]
    if not sendable:
        return outcomes
    pairs = sorted({(f.sop_class, f.transfer_syntax) for f in sendable})
    assoc = associate(port, pairs)
    assert assoc.is_established, "the node refused the association"
    accepted = {
        (str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts
    }
    rejected = {
        (str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.rejected_contexts
    }
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's own bytes, not pydicom's re-encoding
    try:
        for facts in sendable:
            pair = (facts.sop_class, facts.transfer_syntax)
            if pair not in accepted:
                assert pair in rejected, f"{facts.file.name}: context neither accepted nor rejected"
                outcomes[facts.file.name] = Outcome(REFUSED)
                continue
            if not assoc.is_established:  # the node ended the association: a new one
                close_dropped(assoc)
                assoc = associate(port, pairs)
                assert assoc.is_established
            response = assoc.send_c_store(facts.file.path)
            if "Status" not in response:
                outcomes[facts.file.name] = Outcome("no response (association ended)")
                continue
            comment = str(response.get("ErrorComment", "") or "")
            outcomes[facts.file.name] = Outcome(dimse_status(int(response.Status)), comment)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
        else:
            close_dropped(assoc)
    return outcomes


def upload(http: requests.Session, api: str, file: CorpusFile) -> Outcome:
    """``POST /predict`` with the file; ``<status> <error code>``, or ``201 predicted``."""
    with file.path.open("rb") as stream:
        response = http.post(
            f"{api}/predict",
            files={"file": (file.path.name, stream, "application/octet-stream")},
            timeout=180,
        )
    try:
        body = response.json()
    except ValueError:
        return Outcome(f"{response.status_code} (not JSON)", response.text[:60])
    if response.status_code == 201:
        return Outcome("201 predicted", str(body.get("prediction")))
    error = body.get("error", {})
    answer = f"{response.status_code} {error.get('code')}"
    message = str(error.get("message", ""))
    if answer == NOT_AN_IMAGE and "has no pixel data" in message:
        answer = NO_PIXEL_DATA
    return Outcome(answer, message.split(";")[0].split(":")[0])


def node_is_up(server: ServedNode) -> str | None:
    """None when the process runs, answers C-ECHO and ``/health`` says ok; else what failed."""
    if not server.alive():
        return f"the node exited with {server.process.returncode}"
    assoc = associate(server.dicom_port)
    if not assoc.is_established:
        return "the node refused an association for C-ECHO"
    status = assoc.send_c_echo()
    assoc.release()
    if status.get("Status") != 0x0000:
        return "C-ECHO did not answer 0x0000"
    health = requests.get(f"{server.base_url}/health", timeout=120)
    if health.status_code != 200:
        return f"/health answered {health.status_code}: {health.text[:200]}"
    return None


def model_state(node: ServedNode) -> str:
    """``warming``, ``ready`` or ``failed``: the model check of ``/health``."""
    health = requests.get(f"{node.base_url}/health", timeout=120).json()
    return str(health["checks"]["model"]["state"])


def _assert_up(node: ServedNode, when: str) -> None:
    down = node_is_up(node)
    assert down is None, f"{when}: {down}\n{node.log_text()[-5000:]}"


def _login(api: str) -> requests.Session:
    http = requests.Session()
    response = http.post(
        f"{api}/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=120
    )
    assert response.status_code == 200, response.text
    http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
    return http


def _faults(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(m in line for m in FAULT_MARKERS)]


def _settled(database: str) -> bool:
    """Every series complete, every job finished, every result delivered or dead."""
    receiving = query(
        database, f"SELECT count(*) FROM series WHERE state = '{SeriesState.RECEIVING}'"
    )
    open_jobs = query(
        database,
        f"SELECT count(*) FROM job WHERE state IN ('{JobState.QUEUED}', '{JobState.RUNNING}')",
    )
    pending = query(
        database, f"SELECT count(*) FROM delivery WHERE state = '{DeliveryState.PENDING}'"
    )
    return all(rows and rows[0][0] == 0 for rows in (receiving, open_jobs, pending))


@dataclass(frozen=True)
class SeriesJob:
    """One analysis of a series the node stored, and the corpus files in that series."""

    files: list[str]
    version: int
    instances: int
    state: str
    result: str


def series_jobs(database: str, facts: list[Facts], stored: set[str]) -> list[SeriesJob]:
    rows = query(
        database,
        "SELECT s.series_instance_uid, j.version, j.instance_count, j.state, j.details, "
        "p.prediction_class FROM job j JOIN series s ON s.id = j.series_id "
        "LEFT JOIN prediction p ON p.job_id = j.id ORDER BY s.id, j.version",
    )
    jobs = []
    for series, version, instances, state, details, verdict in rows:
        found = json.loads(details) if isinstance(details, str) else (details or {})
        result = str(verdict or "")
        if found.get("analysed") is False:
            result = f"not analysed: {found.get('not_analysed_reason')}"
        files = [
            f.file.name for f in facts if f.series_instance_uid == series and f.file.name in stored
        ]
        jobs.append(SeriesJob(files, int(version), int(instances), str(state), result))
    return jobs


def report(
    facts: list[Facts],
    dimse: dict[str, Outcome],
    uploads: dict[str, Outcome],
    jobs: list[SeriesJob],
    seconds: float,
) -> str:
    """The summary by outcome, the series jobs, and one row per file."""
    by_outcome = Counter((dimse[f.file.name].answer, uploads[f.file.name].answer) for f in facts)
    lines = [
        f"{len(facts)} files ({sum(f.size for f in facts) / 2**20:.1f} MiB), each sent over "
        f"DIMSE and to `POST /predict`, in {seconds:.0f} s; every answer as the rule states.",
        "",
        "| files | DIMSE | upload (`POST /predict`) |",
        "|---:|---|---|",
        *(f"| {n} | {d} | {u} |" for (d, u), n in by_outcome.most_common()),
        "",
        "The CT series stored over DIMSE, analysed by the node and their results delivered:",
        "",
        "| series (stored files) | analysis | instances | job | result |",
        "|---|---:|---:|---|---|",
        *(
            f"| {_files(job.files)} | {job.version} | {job.instances} | {job.state} "
            f"| {_short(job.result)} |"
            for job in jobs
        ),
        "",
        "| file | size | SOP class / modality | DIMSE | upload |",
        "|---|---:|---|---|---|",
        *(
            f"| `{f.file.name}` | {f.size:,} | {f.kind} | {_short(dimse[f.file.name].cell())} "
            f"| {_short(uploads[f.file.name].cell())} |"
            for f in facts
        ),
    ]
    return "\n".join(lines)


def _files(names: list[str]) -> str:
    if len(names) <= 2:
        return ", ".join(f"`{name}`" for name in names)
    return f"`{names[0]}` and {len(names) - 1} more"


def _short(text: object, limit: int = 90) -> str:
    value = str(text).replace("|", "/").replace("\n", " ")
    return value if len(value) <= limit else value[: limit - 1] + "…"


def the_corpus() -> list[CorpusFile]:
    """pydicom's test files and pydicom-data's. pydicom-data is a dev dependency: without
    it the drill fails under CI and runs with pydicom's files alone elsewhere."""
    files = corpus(pydicom_test_files(), "pydicom")
    data = pydicom_data_files()
    if data is None:
        if IN_CI:
            pytest.fail("pydicom-data (the data_store package) is not installed")
        return files
    return files + corpus(data, "pydicom-data")


@pytest.mark.drill
@pytest.mark.slow
@pytest.mark.backend_neutral(
    "each file's answer comes from the parsers, the SCP and the upload API, not the "
    "database; the rows it then counts (instances, jobs, deliveries) are written by the "
    "code that tests/dicom and tests/e2e check on both backends"
)
def test_every_corpus_file_gets_its_stated_answer(
    drill: Drill,
    node: ServedNode,
    databases: Databases,
    results_peer: ResultsPeer,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    facts = [facts_of(file) for file in the_corpus()]
    database = databases.url(tmp_path / "storage")
    # /health answers 200 while the model warms: the node receives meanwhile, and the
    # first prediction waits for the model.
    assert wait_until(lambda: node_is_up(node) is None, timeout=120, step=0.5), (
        f"{node_is_up(node)}\n{node.log_text()}"
    )
    http = _login(node.base_url)

    # DIMSE needs no model, nor does refusing an upload: both run while the model warms.
    # The CT images, which the API analyses, go last, once it is ready.
    dimse: dict[str, Outcome] = {}
    uploads: dict[str, Outcome] = {}
    for batch in _batches(facts):
        dimse.update(send_over_dimse(node.dicom_port, batch))
        _assert_up(node, f"after sending {batch[-1].file.name} over DIMSE")
    for analysed in (False, True):
        if analysed:
            assert wait_until(lambda: model_state(node) == "ready", timeout=180, step=0.5)
        for batch in _batches([f for f in facts if f.ct_rule == analysed]):
            for item in batch:
                uploads[item.file.name] = upload(http, node.base_url, item.file)
            _assert_up(node, f"after uploading {batch[-1].file.name}")
    assert wait_until(lambda: _settled(database), timeout=120, step=0.2), node.log_text()[-5000:]

    stored = {f.file.name for f in facts if dimse[f.file.name].answer == dimse_status(0x0000)}
    jobs = series_jobs(database, facts, stored)
    drill.report("corpus", report(facts, dimse, uploads, jobs, time.monotonic() - started))

    wrong = [
        f"{f.file.name}: DIMSE {dimse[f.file.name].cell()!r}, expected {expected_dimse(f)!r}"
        for f in facts
        if dimse[f.file.name].answer != expected_dimse(f)
    ] + [
        f"{f.file.name}: upload {uploads[f.file.name].cell()!r}, expected {expected_upload(f)!r}"
        for f in facts
        if uploads[f.file.name].answer != expected_upload(f)
    ]
    assert not wrong, "\n".join(wrong)
    assert not [o for o in uploads.values() if o.answer.startswith("5")]
    assert _faults(node.log_text()) == []
    assert node.alive()

    # Everything acknowledged is recorded, once per SOP instance.
    assert stored, "the corpus has CT images that the node stores"
    recorded = query(database, "SELECT count(*) FROM instance")[0][0]
    assert recorded == len({f.sop_instance_uid for f in facts if f.file.name in stored})
    # Every stored CT series was analysed (or found unanalysable) and its results delivered.
    assert jobs and {job.state for job in jobs} == {JobState.DONE}, jobs
    assert all(job.files for job in jobs), jobs
    delivered = dict(query(database, "SELECT state, count(*) FROM delivery GROUP BY state"))
    assert delivered.keys() == {DeliveryState.DONE}, delivered
    assert sum(results_peer.received.values()) == delivered[DeliveryState.DONE]
