"""The lean storage receiver (``store_receiver = "lean"``) against real peers.

The whole SCP suite also runs against it (``LUNGNODE_STORE_RECEIVER=lean``); these
are the cases only the lean receiver has: who serves which association, small
PDVs, an abort in the middle of an instance, the association's outcome.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
    Verification,
)
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Association, Instance
from tests.conftest import SENDER_AE, require_tool
from tests.dicom.helpers import associate, row_count, wait_until
from tests.support.synthetic import make_ct_series, write_series


def _lean_node(
    make_settings: Callable[..., Settings], start: Callable[..., Node], **kw: object
) -> Node:
    return start(make_settings(store_receiver="lean", **kw), serve_http=False)


def _outcomes(node: Node) -> list[str | None]:
    with node.sessions() as session:
        return list(session.scalars(select(Association.outcome).order_by(Association.id)))


def test_storescu_series_in_small_pdus_is_stored_as_sent(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """DCMTK storescu, every data set in many 4 KB PDUs (the node's maximum): the
    files stored are the sent data sets byte for byte, each row recorded."""
    node = _lean_node(make_settings, start_node, max_pdu_size=4096)
    paths = write_series(make_ct_series(6, rows=64, columns=64), tmp_path / "sent")
    storescu = require_tool("storescu")
    result = subprocess.run(
        [
            storescu,
            "-aet",
            SENDER_AE,
            "-aec",
            "LUNGNODE",
            "127.0.0.1",
            str(node.scp.port),
            "+sd",
            str(tmp_path / "sent"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert row_count(node, Instance) == 6
    for path in paths:
        stored = next(node.settings.incoming_dir.rglob(path.name))
        sent, received = dcmread(path), dcmread(stored)
        assert received.PixelData == sent.PixelData
        assert received.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert wait_until(lambda: _outcomes(node) == ["released"])
    assert node.scp.lean is not None and node.scp.lean.active == 0


def test_echo_store_and_release_with_pynetdicom(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    node = _lean_node(make_settings, start_node)
    assoc = associate(node.scp.port, [(CTImageStorage, ExplicitVRLittleEndian)])
    assert assoc.is_established
    # Served by the lean receiver: no pynetdicom association runs in the node.
    assert node.scp.lean is not None and node.scp.lean.active == 1
    assert not node.scp.ae.active_associations
    assert assoc.send_c_echo().Status == 0x0000
    for dataset in make_ct_series(3, rows=32, columns=32):
        assert assoc.send_c_store(dataset).Status == 0x0000
    assoc.release()
    assert row_count(node, Instance) == 3
    assert wait_until(lambda: _outcomes(node) == ["released"])


def test_abort_in_the_middle_of_an_instance_stores_nothing(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    """Half an instance, then A-ABORT: not acknowledged, so not stored, no file left."""
    node = _lean_node(make_settings, start_node)
    first, second = make_ct_series(2, rows=64, columns=64)
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 0
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="LUNGNODE")
    assert assoc.is_established
    assert assoc.send_c_store(first).Status == 0x0000
    # The command and the first 1 KB of the next data set, by hand; then abort.
    request = C_STORE()
    request.MessageID = 2
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = second.SOPInstanceUID
    request.Priority = 0
    encoded = encode(second, False, True)  # explicit VR little endian, as the context
    assert encoded is not None
    request.DataSet = BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    transport = assoc.dul.socket
    assert context_id is not None and transport is not None
    pdus = list(message.encode_msg(context_id, 1024))
    for primitive in pdus[:3]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        transport.send(pdu.encode())
    time.sleep(0.3)
    assoc.abort()
    assert wait_until(lambda: _outcomes(node) == ["aborted"])
    assert row_count(node, Instance) == 1
    stored = list(node.settings.incoming_dir.rglob("*.dcm"))
    assert [p.name for p in stored] == [f"{first.SOPInstanceUID}.dcm"]
    assert not list(node.settings.incoming_dir.rglob("*.part"))


def test_a_non_storage_context_goes_to_pynetdicom(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    """Storage Commitment proposed beside CT storage: pynetdicom serves the association."""
    node = _lean_node(make_settings, start_node)
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="LUNGNODE")
    assert assoc.is_established
    assert node.scp.lean is not None and node.scp.lean.active == 0
    assert wait_until(lambda: bool(node.scp.ae.active_associations))
    (dataset,) = make_ct_series(1, rows=32, columns=32)
    assert assoc.send_c_store(dataset).Status == 0x0000
    assoc.release()
    assert row_count(node, Instance) == 1
    assert wait_until(lambda: _outcomes(node) == ["released"])


def test_association_limit_counts_both_receivers(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    node = _lean_node(make_settings, start_node, max_associations=2)
    lean = associate(node.scp.port, [(CTImageStorage, ExplicitVRLittleEndian)])
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StorageCommitmentPushModel)
    full = ae.associate("127.0.0.1", node.scp.port, ae_title="LUNGNODE")
    assert lean.is_established and full.is_established
    assert associate(node.scp.port).is_rejected  # lean, over the limit
    assert ae.associate("127.0.0.1", node.scp.port, ae_title="LUNGNODE").is_rejected
    lean.release()
    full.release()
    # Both kinds free their slots once their threads are done (pynetdicom's linger a little).
    assert wait_until(lambda: node.scp.lean is not None and node.scp.lean.active == 0)
    assert wait_until(lambda: not node.scp.ae.active_associations)
    again = associate(node.scp.port)
    assert again.is_established
    again.release()


def test_a_request_seen_before_is_remembered_and_still_checked(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    """The same A-ASSOCIATE-RQ three times: decoded and negotiated once, refused
    while the one association allowed runs, accepted with its contexts after."""
    node = _lean_node(make_settings, start_node, max_associations=1)
    lean = node.scp.lean
    assert lean is not None
    contexts = [(CTImageStorage, ExplicitVRLittleEndian)]
    first_slice, second_slice = make_ct_series(2, rows=32, columns=32)
    first = associate(node.scp.port, contexts)
    assert first.is_established
    assert associate(node.scp.port, contexts).is_rejected  # over the limit, remembered or not
    assert first.send_c_store(first_slice).Status == 0x0000
    first.release()
    assert wait_until(lambda: lean.active == 0)
    again = associate(node.scp.port, contexts)
    assert again.is_established
    assert [str(cx.abstract_syntax) for cx in again.accepted_contexts] == [
        Verification,
        CTImageStorage,
    ]
    assert again.send_c_store(second_slice).Status == 0x0000
    again.release()
    assert row_count(node, Instance) == 2
    assert len(lean._requests) == 1
    assert wait_until(lambda: _outcomes(node) == ["released", "released"])


def test_silent_peer_is_aborted_after_the_network_timeout(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    node = _lean_node(make_settings, start_node, network_timeout=1.0)
    assoc = associate(node.scp.port, [(CTImageStorage, ExplicitVRLittleEndian)])
    assert assoc.is_established
    (dataset,) = make_ct_series(1, rows=32, columns=32)
    assert assoc.send_c_store(dataset).Status == 0x0000
    assert wait_until(lambda: assoc.is_aborted, timeout=10)
    assert wait_until(lambda: _outcomes(node) == ["aborted"])


def test_the_pynetdicom_receiver_remains_when_chosen(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    node = start_node(make_settings(store_receiver="pynetdicom"), serve_http=False)
    assert node.scp.lean is None
    assoc = associate(node.scp.port, [(CTImageStorage, ExplicitVRLittleEndian)])
    assert assoc.is_established
    assert wait_until(lambda: bool(node.scp.ae.active_associations))
    for dataset in make_ct_series(2, rows=32, columns=32):
        assert assoc.send_c_store(dataset).Status == 0x0000
    assoc.release()
    assert row_count(node, Instance) == 2
    assert wait_until(lambda: _outcomes(node) == ["released"])
