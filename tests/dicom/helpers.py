"""Small SCU helpers for the tests: real associations to the node under test."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.db.models import Job
from tests.conftest import SENDER_AE
from tests.ports import free_port as free_port


def associate(
    port: int,
    contexts: Sequence[tuple[str, str]] = (),
    *,
    calling_ae: str = SENDER_AE,
    called_ae: str = "LUNGNODE",
) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    for sop_class, syntax in contexts:
        # One context per pair (the setter of requested_contexts appends to what is there).
        ae.add_requested_context(sop_class, [syntax])
    return ae.associate("127.0.0.1", port, ae_title=called_ae)


def store_all(port: int, datasets: Sequence[Dataset]) -> list[int]:
    """Send over one association; the status of each C-STORE (-1: no response)."""
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    assoc = associate(port, pairs)
    assert assoc.is_established, "association was not accepted"
    statuses = []
    try:
        for ds in datasets:
            response = assoc.send_c_store(ds)
            statuses.append(int(response.Status) if "Status" in response else -1)
    finally:
        assoc.release()
    return statuses


def store_files(port: int, paths: Sequence[Path]) -> list[int]:
    from pydicom import dcmread

    first = [dcmread(p, stop_before_pixels=True) for p in paths[:1]]
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in first})
    assoc = associate(port, pairs)
    assert assoc.is_established
    statuses = []
    try:
        for path in paths:
            response = assoc.send_c_store(path)
            statuses.append(int(response.Status) if "Status" in response else -1)
    finally:
        assoc.release()
    return statuses


def capture_stream(port: int, path: Path) -> bytes:
    """What an SCU sends to associate, C-ECHO, C-STORE the file at ``path`` and
    release: its PDUs as bytes, to replay (or damage) on a plain socket."""
    from pydicom import dcmread
    from pynetdicom import evt

    header = dcmread(path, stop_before_pixels=True)
    sent: list[bytes] = []
    ae = AE(ae_title=SENDER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID))
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="LUNGNODE",
        evt_handlers=[(evt.EVT_DATA_SENT, lambda event: sent.append(bytes(event.data)))],
    )
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    return b"".join(sent)


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last answer."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def row_count(node: Node, model: type) -> int:
    """Rows of one table in the node's database."""
    from sqlalchemy import func, select

    with node.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def close_dropped(assoc: Association) -> None:
    """Close the SCU side of an association the peer dropped (refused, killed, reset).

    pynetdicom 3.0 closes its socket only on a release or an abort it sends
    itself; when the peer goes away first the socket stays open until garbage
    collection, which surfaces as a ResourceWarning in a later test.
    """
    assoc.kill()  # stops the DUL thread; nothing else uses the socket then
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.close()


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; an exited process waiting to be reaped (zombie) is not."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def finished_job(node: Node, timeout: float = 120) -> Job:
    """The node's first job once it is done or failed; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with node.sessions() as session:
            job = session.scalars(select(Job).order_by(Job.id)).first()
        if job is not None and job.state in ("done", "failed"):
            return job
        assert time.monotonic() < deadline, f"job did not finish: {job and job.state}"
        time.sleep(0.05)


def store_or_none(assoc: Association, dataset: Dataset | Path) -> Dataset | None:
    """The C-STORE response, or None when the association died first: the SCU may
    notice before the send (pynetdicom raises) or during it (no Status)."""
    if not assoc.is_established:
        return None
    try:
        response = assoc.send_c_store(dataset)
    except RuntimeError:  # noticed between the check and the send
        return None
    return response if "Status" in response else None
