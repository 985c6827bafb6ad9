"""DCMTK as the PACS, and ``lungnode send`` as a user runs it.

echoscu and storescu are what sites use to check a DICOM node; the node must
answer them the way PS3.7 says (association acceptance, C-ECHO and C-STORE
statuses), whatever they send.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.db.models import Instance, Job
from tests.conftest import SENDER_AE, require_tool
from tests.dicom.helpers import associate, free_port, row_count, store_files, wait_until
from tests.support.synthetic import chest_phantom_hu, make_ct_series, write_series

LUNGNODE = Path(sys.executable).with_name("lungnode")
#: storescu -d prints each response's status as ``DIMSE Status : 0xc003: ...``.
_DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")


def _echoscu(port: int, calling_ae: str = SENDER_AE) -> subprocess.CompletedProcess[str]:
    echoscu = require_tool("echoscu")
    command = [echoscu, "-aet", calling_ae, "-aec", "LUNGNODE", "127.0.0.1", str(port)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def _storescu(port: int, *arguments: str) -> subprocess.CompletedProcess[str]:
    """storescu with options and input (last) in ``arguments``; host and port go between."""
    storescu = require_tool("storescu")
    *options, source = arguments
    command = [storescu, "-aet", SENDER_AE, "-aec", "LUNGNODE", *options]
    command += ["127.0.0.1", str(port), source]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_echoscu_from_a_known_peer_succeeds(node: Node) -> None:
    result = _echoscu(node.scp.port)
    assert result.returncode == 0, result.stderr


def test_echoscu_from_an_unknown_ae_is_rejected(node: Node) -> None:
    result = _echoscu(node.scp.port, calling_ae="STRANGER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    # Rejected for the calling AE title (PS3.8 7.1.1.9, reason 3), not for anything else.
    assert "Calling AE Title Not Recognized" in result.stderr


@pytest.mark.slow
def test_storescu_sends_a_full_series_from_a_directory(node: Node, tmp_path: Path) -> None:
    n_slices = 300
    # One phantom slice, shifted per slice: a realistic size without 300 phantom renders.
    base = np.rint(chest_phantom_hu(n_slices // 2, n_slices, 512, 512))
    datasets = make_ct_series(
        n_slices, rows=512, columns=512, slice_hu=lambda k: base + float(k % 5)
    )
    directory = tmp_path / "series"
    write_series(datasets, directory)
    result = _storescu(node.scp.port, "+sd", str(directory))
    assert result.returncode == 0, result.stderr[-2000:]
    assert row_count(node, Instance) == n_slices
    stored = list(node.settings.incoming_dir.rglob("*.dcm"))
    assert len(stored) == n_slices
    assert {p.stem for p in stored} == {str(ds.SOPInstanceUID) for ds in datasets}
    assert wait_until(lambda: row_count(node, Job) >= 1, timeout=20)
    with node.sessions() as session:
        jobs = session.scalars(select(Job)).all()
    assert [(job.state, job.instance_count, job.version) for job in jobs] == [
        ("queued", n_slices, 1)
    ]


def _truncated_file(directory: Path) -> Path:
    """A file that ends 1000 bytes early, inside its Pixel Data element."""
    source = write_series(make_ct_series(1, rows=64, columns=64), directory / "source")[0]
    data = source.read_bytes()
    target = directory / "truncated.dcm"
    target.write_bytes(data[: len(data) - 1000])
    return target


def test_truncated_file_is_refused_and_the_node_still_answers(node: Node, tmp_path: Path) -> None:
    truncated = _truncated_file(tmp_path)
    # storescu reads a file whole before sending it, so it never puts these bytes on
    # the wire ("premature end of stream"); a careless sender that streams the file
    # as it is (pynetdicom's send_c_store(path) does) is what the node must survive.
    result = _storescu(node.scp.port, str(truncated))
    assert result.returncode != 0
    assert "premature end of stream" in result.stderr
    assert row_count(node, Instance) == 0

    statuses = store_files(node.scp.port, [truncated])
    assert 0xC000 <= statuses[0] <= 0xCFFF
    assert row_count(node, Instance) == 0
    assert not list(node.settings.incoming_dir.rglob("*.dcm"))
    assert _echoscu(node.scp.port).returncode == 0


def test_short_pixel_data_from_storescu_is_refused(node: Node, tmp_path: Path) -> None:
    # A well-formed file whose Pixel Data is shorter than Rows x Columns x 2 bytes:
    # storescu sends it, and the node must refuse it (PS3.5 8.1.1) with 0xC003.
    (dataset,) = make_ct_series(1, rows=64, columns=64)
    dataset.PixelData = dataset.PixelData[:-1000]
    (path,) = write_series([dataset], tmp_path / "short")
    result = _storescu(node.scp.port, "-d", str(path))
    statuses = [int(code, 16) for code in _DIMSE_STATUS.findall(result.stderr)]
    assert statuses == [0xC003], result.stderr[-2000:]
    assert "truncated" in result.stderr
    assert row_count(node, Instance) == 0
    assert _echoscu(node.scp.port).returncode == 0
    assoc = associate(node.scp.port)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def _lungnode_send(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LUNGNODE_STORAGE_DIR": str(tmp_path / "sender-storage"),
        "LUNGNODE_CONFIG": str(tmp_path / "no-config.toml"),
    }
    return subprocess.run(
        [str(LUNGNODE), "send", *arguments, "--calling-ae", SENDER_AE, "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=tmp_path,
    )


def test_lungnode_send_delivers_a_directory(node: Node, tmp_path: Path) -> None:
    datasets = make_ct_series(5, rows=64, columns=64)
    directory = tmp_path / "series"
    write_series(datasets, directory)
    result = _lungnode_send(tmp_path, str(directory), "--to", f"LUNGNODE@127.0.0.1:{node.scp.port}")
    assert result.returncode == 0, result.stderr
    assert "sent 5 of 5" in result.stdout
    with node.sessions() as session:
        received = set(session.scalars(select(Instance.sop_instance_uid)))
    assert received == {str(ds.SOPInstanceUID) for ds in datasets}


def test_lungnode_send_to_a_closed_port_fails_clearly(tmp_path: Path) -> None:
    directory = tmp_path / "series"
    write_series(make_ct_series(2, rows=32, columns=32), directory)
    result = _lungnode_send(tmp_path, str(directory), "--to", f"LUNGNODE@127.0.0.1:{free_port()}")
    assert result.returncode != 0
    assert "sent 0 of 2" in result.stdout
    assert "no association" in result.stderr
    assert "Connection refused" in result.stderr
