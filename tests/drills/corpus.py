"""The bad-input corpus and the rule that states what the node answers to each file.

The corpus is every file of pydicom's own test data (``pydicom/data/test_files``)
and of pydicom-data (the ``data_store`` package, its ``data`` folder): CT, MR,
US, CR, SR, RT, SEG, DICOMDIRs, files without file meta, truncated and malformed
ones, JSON and text. Nothing is downloaded.

:func:`facts_of` reads each file with pydicom only, never with lungnode, and
:func:`expected_dimse` and :func:`expected_upload` turn those facts into the
answer the node's documentation promises (docs/conformance.md, section 2.4;
docs/api.md, ``POST /predict``). The drill then asserts that the node gave
exactly that answer to every file.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import UID

#: What a PACS may send and the node accepts (PS3.4 B.5): CT and Enhanced CT Image Storage.
CT_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"})
#: The transfer syntaxes docs/conformance.md lists for them (section 2.2).
ACCEPTED_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
        "1.2.840.10008.1.2.5",
    }
)
#: The attributes whose absence answers 0xC001 (conformance 2.4), in the order checked.
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
PIXEL_ATTRIBUTES = ("Rows", "Columns", "BitsAllocated")
#: What a sender reads from a file's meta to propose a context and send it as stored.
SENDER_NEEDS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
#: ``max_upload_mb``'s default (docs/configuration.md): larger uploads answer 413.
MAX_UPLOAD_BYTES = 10 * 2**20
#: Smallest side the API analyses (docs/api.md): smaller answers 422 image_too_small.
MIN_SIDE = 32

# Outcomes over DIMSE.
NOT_SENDABLE = "not sendable"
REFUSED = "context refused"
# Outcomes of an upload: a 415 for a DICOM file says that it has no pixel data.
NOT_AN_IMAGE = "415 unsupported_media_type"
NO_PIXEL_DATA = "415 unsupported_media_type, no pixel data"
STATUS_NAMES = {
    0x0000: "stored",
    0xA700: "out of resources",
    0xA900: "not CT",
    0xC000: "cannot understand",
    0xC001: "missing attribute",
    0xC002: "invalid UID",
    0xC003: "bad pixel data",
}


def dimse_status(status: int) -> str:
    """``0x0000 stored``: a C-STORE status as the table shows it."""
    return f"0x{status:04X} {STATUS_NAMES.get(status, 'unknown status')}"


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus; ``name`` says where it comes from, e.g. ``pydicom/CT_small.dcm``."""

    name: str
    path: Path


def pydicom_test_files() -> Path:
    return Path(pydicom.__file__).resolve().parent / "data" / "test_files"


def pydicom_data_files() -> Path | None:
    """pydicom-data's files (the ``data_store`` package), found without importing it:
    pydicom's own look-up would try to download what is missing."""
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def corpus(root: Path, label: str) -> list[CorpusFile]:
    """Every file under ``root``, sorted by its path, named ``<label>/<relative path>``."""
    return [
        CorpusFile(f"{label}/{path.relative_to(root).as_posix()}", path)
        for path in sorted(
            p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
    ]


@dataclass(frozen=True)
class Facts:
    """What pydicom (not lungnode) says about one file."""

    file: CorpusFile
    size: int
    #: A DICOM file (PS3.10) whose file meta names the SOP class, instance and
    #: transfer syntax: what a sender needs to propose a presentation context.
    sendable: bool
    why_not_sendable: str
    sop_class: str  # Media Storage SOP Class UID, else SOP Class UID, else ""
    transfer_syntax: str
    modality: str
    #: The whole data set parses (pixel data included) without forcing.
    parses: bool
    missing: tuple[str, ...]  # required UIDs absent from the data set
    invalid_uid: bool
    pixel_attributes_missing: tuple[str, ...]  # PixelData, Rows, Columns, BitsAllocated
    has_pixels: bool  # PixelData or FloatPixelData: what the upload store asks
    pixels_complete: bool
    ct_rule: bool  # CT SOP class, Modality CT, one grey sample
    decodable: bool  # a CT image whose pixels pydicom's pixel_array decodes
    rows: int
    columns: int
    series_instance_uid: str
    sop_instance_uid: str

    @property
    def kind(self) -> str:
        """SOP class name and modality, for the table."""
        if not self.sop_class:
            return "–"
        name = UID(self.sop_class).name
        name = name.removesuffix(" Storage").removesuffix(" Image")
        return f"{name} / {self.modality or '–'}"


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _valid_uid(value: object) -> bool:
    text = str(value)
    return 0 < len(text) <= 64 and all(part.isdigit() for part in text.split("."))


def _pixels_complete(dataset: Dataset, transfer_syntax: str) -> bool:
    """PS3.5 8.2: native pixel data as long as the image says, or encapsulated with a fragment."""
    data = dataset.get("PixelData")
    if data is None:
        return False
    data = bytes(data.value) if hasattr(data, "value") else bytes(data)
    if UID(transfer_syntax).is_encapsulated:
        try:
            if len(data) < 8 or data[:4] != b"\xfe\xff\x00\xe0":
                return False
            offset = 8 + int.from_bytes(data[4:8], "little")
            return any(True for _ in generate_fragments(data[offset:]))
        except Exception:
            return False
    frames = _integer(dataset, "NumberOfFrames") or 1
    samples = _integer(dataset, "SamplesPerPixel") or 1
    rows, columns = _integer(dataset, "Rows") or 0, _integer(dataset, "Columns") or 0
    bits = _integer(dataset, "BitsAllocated") or 0
    return len(data) >= rows * columns * samples * frames * bits // 8


def _is_ct(dataset: Dataset, sop_class: str) -> bool:
    """docs/api.md: CT or Enhanced CT Image Storage, Modality CT, one grey sample per pixel."""
    samples = dataset.get("SamplesPerPixel")
    photometric = str(dataset.get("PhotometricInterpretation") or "").strip()
    return (
        str(dataset.get("SOPClassUID") or sop_class) in CT_SOP_CLASSES
        and str(dataset.get("Modality") or "").strip() == "CT"
        and (samples in (None, "") or str(samples).strip() == "1")
        and (not photometric or photometric in ("MONOCHROME1", "MONOCHROME2"))
    )


def facts_of(file: CorpusFile) -> Facts:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about much of this corpus
        return _facts_of(file)


def _facts_of(file: CorpusFile) -> Facts:
    from pynetdicom.dsutils import split_dataset

    size = file.path.stat().st_size
    try:
        # What pynetdicom's SCU reads to send a file as it is stored.
        meta, _offset = split_dataset(file.path)
        lacking = [kw for kw in SENDER_NEEDS if not meta.get(kw)]
        why_not = f"file meta lacks {', '.join(lacking)}" if lacking else ""
    except Exception:
        meta, why_not = Dataset(), "not a DICOM file (no preamble and file meta)"
    dataset: Dataset
    try:
        dataset = pydicom.dcmread(file.path, force=False)
        parses = True
    except Exception:
        dataset, parses = Dataset(), False
    sop_class = str(meta.get("MediaStorageSOPClassUID") or dataset.get("SOPClassUID") or "")
    transfer_syntax = str(meta.get("TransferSyntaxUID") or "")
    missing = tuple(kw for kw in REQUIRED_UIDS if not dataset.get(kw))
    pixel_missing = tuple(
        kw for kw in ("PixelData", *PIXEL_ATTRIBUTES) if dataset.get(kw) in (None, "")
    )
    has_pixels = "PixelData" in dataset or "FloatPixelData" in dataset
    ct_rule = parses and _is_ct(dataset, sop_class)
    decodable = False
    if has_pixels and ct_rule:  # only a CT image's pixels are ever decoded
        try:
            dataset.pixel_array  # noqa: B018  (decoding is the point)
            decodable = True
        except Exception:
            decodable = False
    return Facts(
        file=file,
        size=size,
        sendable=not why_not,
        why_not_sendable=why_not,
        sop_class=sop_class,
        transfer_syntax=transfer_syntax,
        modality=str(dataset.get("Modality") or "").strip(),
        parses=parses,
        missing=missing,
        invalid_uid=not missing and not all(_valid_uid(dataset.get(kw)) for kw in REQUIRED_UIDS),
        pixel_attributes_missing=pixel_missing,
        has_pixels=has_pixels,
        pixels_complete=not pixel_missing and _pixels_complete(dataset, transfer_syntax),
        ct_rule=ct_rule,
        decodable=decodable,
        rows=_integer(dataset, "Rows") or 0,
        columns=_integer(dataset, "Columns") or 0,
        series_instance_uid=str(dataset.get("SeriesInstanceUID") or ""),
        sop_instance_uid=str(dataset.get("SOPInstanceUID") or ""),
    )


def expected_dimse(facts: Facts) -> str:
    """The node's answer over DIMSE (docs/conformance.md 2.2 and 2.4), in its order."""
    if not facts.sendable:
        return NOT_SENDABLE
    if facts.sop_class not in CT_SOP_CLASSES:
        return REFUSED
    if facts.transfer_syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        return REFUSED
    if not facts.parses:
        return dimse_status(0xC000)
    if facts.missing:
        return dimse_status(0xC001)
    if facts.invalid_uid:
        return dimse_status(0xC002)
    if facts.pixel_attributes_missing:
        return dimse_status(0xC001)
    if not facts.pixels_complete:
        return dimse_status(0xC003)
    if not facts.ct_rule:
        return dimse_status(0xA900)
    return dimse_status(0x0000)


def expected_upload(facts: Facts) -> str:
    """The answer of ``POST /predict`` with the file (docs/api.md): ``<status> <code>``."""
    if facts.size > MAX_UPLOAD_BYTES:
        return "413 payload_too_large"
    if not facts.parses:
        return NOT_AN_IMAGE
    if not facts.has_pixels:
        return NO_PIXEL_DATA
    if not facts.ct_rule:
        return "422 not_ct"
    if not facts.decodable:
        return "422 unreadable_image"
    if min(facts.rows, facts.columns) < MIN_SIDE:
        return "422 image_too_small"
    return "201 predicted"
