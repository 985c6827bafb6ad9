"""The lean receiver's bytes are pynetdicom's: responses, file meta, PDVs."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu import P_DATA_TF

from lungnode.dicom import lean_codec as codec

CT = "1.2.840.10008.5.1.4.1.1.2"


def _pynetdicom_command(message: C_STORE_RSP | C_ECHO_RSP | C_STORE_RQ) -> bytes:
    """The command set pynetdicom sends (its first PDV; a data set follows for a request)."""
    pdv = next(
        item for p_data in message.encode_msg(1, 0) for item in p_data.presentation_data_value_list
    )
    return bytes(pdv[1][1:])  # [context ID, header byte + fragment]


@pytest.mark.parametrize("comment", [None, "missing required attributes: ['Rows']", "odd"])
@pytest.mark.parametrize("uid", ["1.2.3.4", "1.2.3.45"])
def test_c_store_response_is_pynetdicoms(comment: str | None, uid: str) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = uid
    primitive.Status = 0xC001 if comment else 0x0000
    if comment:
        primitive.ErrorComment = comment  # type: ignore[assignment]
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    ours = codec.response(
        codec.C_STORE_RSP, 7, CT, int(primitive.Status), sop_instance_uid=uid, error_comment=comment
    )
    assert ours == _pynetdicom_command(message)


def test_c_echo_response_is_pynetdicoms() -> None:
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    primitive.Status = 0
    message = C_ECHO_RSP()
    message.primitive_to_message(primitive)
    assert codec.response(codec.C_ECHO_RSP, 3, "1.2.840.10008.1.1", 0) == _pynetdicom_command(
        message
    )


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_file_meta_is_pynetdicoms(syntax: str) -> None:
    meta = create_file_meta(
        sop_class_uid=UID(CT), sop_instance_uid=UID("1.2.3.45"), transfer_syntax=UID(syntax)
    )
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(meta)
    assert codec.file_preamble_and_meta(CT, "1.2.3.45", syntax) == expected


def test_decode_command_reads_a_c_store_request() -> None:
    primitive = C_STORE()
    primitive.MessageID = 12
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.45"
    primitive.Priority = 0
    primitive.DataSet = BytesIO(b"\0" * 8)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = codec.decode_command(_pynetdicom_command(message))
    assert command == codec.Command(codec.C_STORE_RQ, 12, CT, "1.2.3.45", True)


@pytest.mark.parametrize("data", [b"\0\0\0\1\x02\x00\x00\x00", b"\0\0", b"\2\0\0\0\0\0\0\0"])
def test_malformed_command_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(codec.ProtocolError):
        codec.decode_command(data)


def test_p_data_fragments_within_the_peers_maximum() -> None:
    payload = bytes(range(256)) * 4
    pdus = list(codec.p_data(3, False, payload, 100))
    assert all(len(pdu) <= 100 + 6 for pdu in pdus)
    joined = b""
    for index, pdu in enumerate(pdus):
        decoded = P_DATA_TF()
        decoded.decode(pdu)
        (item,) = decoded.presentation_data_value_items
        context_id, value = item.context_id, bytes(item.data or b"")
        assert context_id == 3
        assert value[0] == (0x02 if index == len(pdus) - 1 else 0x00)
        joined += value[1:]
    assert joined == payload
    (pdv,) = codec.pdvs(pdus[0][6:])
    assert (pdv.context_id, pdv.is_command, pdv.is_last) == (3, False, False)
