"""DICOMweb destinations in the settings: parsing, validation once, secrets masked,
Storage Commitment refused, and the bounds of one STOW-RS request."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungnode.config import load_settings
from lungnode.dicom.scu import Outcome
from lungnode.dicom.stow_client import Instance, batches, classify_http_status
from lungnode.errors import ConfigError
from lungnode.peers import DicomwebPeer


@pytest.fixture
def toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "lungnode.toml"
    monkeypatch.setenv("LUNGNODE_CONFIG", str(path))
    for name in ("LUNGNODE_DICOMWEB_PEERS", "LUNGNODE_RESULT_DESTINATIONS", "LUNGNODE_ENV"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_a_base_url_alone_is_a_destination_without_auth() -> None:
    peer = DicomwebPeer.parse("archive=https://pacs.example.org/dicom-web/")
    assert (peer.name, peer.url, peer.auth, peer.verify) == (
        "archive",
        "https://pacs.example.org/dicom-web",
        "none",
        True,
    )
    assert (peer.max_instances, peer.max_bytes) == (100, 64 * 2**20)


def test_credentials_imply_the_scheme_and_stay_secret(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("pa55word\n")
    basic = DicomwebPeer.parse(f"vna=https://vna/dicomweb;user=lungnode;password_file={secret}")
    assert (basic.auth, basic.username, basic.secret_file) == ("basic", "lungnode", secret)
    assert basic.secret is not None and basic.secret.get_secret_value() == "pa55word"
    bearer = DicomwebPeer.parse("cloud=https://h/dw;token=abc.def;verify=false;max_mb=8")
    assert (bearer.auth, bearer.verify, bearer.max_bytes) == ("bearer", False, 8 * 2**20)
    for peer in (basic, bearer):
        assert "pa55word" not in f"{peer} {peer!r}" and "abc.def" not in f"{peer} {peer!r}"
    assert "token=********" in str(bearer) and f"password_file={secret}" in str(basic)


@pytest.mark.parametrize(
    "text",
    [
        "archive",  # no URL
        "bad name=https://h/dw",
        "a=ftp://h/dw",
        "a=https:///dw",  # no host
        "a=https://user:pw@h/dw",  # credentials belong in the options
        "a=https://h/dw?x=1",
        "a=https://h/dw;colour=blue",  # unknown option
        "a=https://h/dw;auth=bearer",  # no token
        "a=https://h/dw;auth=basic;token=t",  # scheme and credentials disagree
        "a=https://h/dw;token=t;token_file=/x",  # both
        "a=https://h/dw;user=u",  # no password
        "a=https://h/dw;token_file=/no/such/file",
        "a=https://h/dw;verify=perhaps",
        "a=https://h/dw;ca=/no/such/ca.pem",
        "a=https://h/dw;max_instances=0",
        "a=https://h:99999/dw",
    ],
)
def test_invalid_destinations_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        DicomwebPeer.parse(text)


def test_ca_with_verify_off_is_a_contradiction(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert DicomwebPeer.parse(f"a=https://h/dw;ca={ca}").ca_bundle == ca
    with pytest.raises(ValueError, match="verify is false"):
        DicomwebPeer.parse(f"a=https://h/dw;ca={ca};verify=false")


def test_settings_take_strings_and_toml_tables(toml_file: Path) -> None:
    toml_file.write_text(
        'dicomweb_peers = ["archive=https://pacs/dicom-web;token=tok",'
        ' { name = "vna", url = "https://vna/dw", verify = false, max_instances = 10 }]\n'
        'result_destinations = ["archive", "vna", "pacs"]\n'
        'peers = ["pacs=ORTHANC@127.0.0.1:4242"]\n'
    )
    settings = load_settings()
    archive, vna = settings.dicomweb_peers
    assert (archive.auth, vna.verify, vna.max_instances) == ("bearer", False, 10)
    assert settings.result_destinations == ["archive", "vna", "pacs"]
    shown = settings.masked()["dicomweb_peers"]
    assert "tok" not in shown.replace("token=", "") and "archive=https://pacs/dicom-web" in shown


def test_environment_lists_several(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGNODE_DICOMWEB_PEERS", "a=https://h1/dw, b=http://127.0.0.1:8042/dw")
    monkeypatch.setenv("LUNGNODE_RESULT_DESTINATIONS", "b")
    settings = load_settings()
    assert [p.name for p in settings.dicomweb_peers] == ["a", "b"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"dicomweb_peers": "archive=https://h/dw", "commit_peers": "archive"},
            "Storage Commitment",
        ),
        (
            {"dicomweb_peers": "scu=https://h/dw"},  # the test settings' DIMSE peer is scu
            "duplicate peer names",
        ),
        ({"dicomweb_peers": "a=https://h/dw", "result_destinations": "b"}, "not among"),
    ],
)
def test_inconsistent_settings_are_refused(
    toml_file: Path, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(peers="scu=TESTSCU@127.0.0.1:11119", **overrides)


def test_production_refuses_credentials_over_plain_http(toml_file: Path) -> None:
    secret = "x" * 32
    remote = load_settings(
        env="production", secret_key=secret, dicomweb_peers="a=http://h/dw;token=t"
    )
    with pytest.raises(ConfigError, match="plain HTTP"):
        remote.check_safe_to_start()
    for allowed in (
        "a=http://127.0.0.1:8042/dw;token=t",
        "a=https://h/dw;token=t",
        "a=http://h/dw",
    ):
        load_settings(
            env="production", secret_key=secret, dicomweb_peers=allowed
        ).check_safe_to_start()


def test_batches_are_per_study_and_bounded() -> None:
    def instance(study: str, number: int, size: int = 10) -> Instance:
        return Instance(Path(f"{study}-{number}"), f"{study}.{number}", study, size)

    items = [instance("s1", n) for n in range(5)] + [instance("s2", 0), instance("s1", 5, 100)]
    cut = [[i.sop_instance_uid for i in batch] for batch in batches(items, 2, 50)]
    assert cut == [["s1.0", "s1.1"], ["s1.2", "s1.3"], ["s1.4"], ["s1.5"], ["s2.0"]]


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (202, Outcome.DELIVERED),
        (400, Outcome.FINAL),
        (401, Outcome.FINAL),
        (403, Outcome.FINAL),
        (404, Outcome.FINAL),
        (413, Outcome.FINAL),
        (415, Outcome.FINAL),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (301, Outcome.FINAL),
    ],
)
def test_http_status_classification(status: int, outcome: Outcome) -> None:
    assert classify_http_status(status) is outcome
