"""Which DICOM images lungnode analyses: CT images, whose pixels are Hounsfield units.

The model reads HU through CT windows (``imaging.windowing``). An MR image, a
Secondary Capture or any other image has no HU: windowing its stored values
as if they were HU gives a confident-looking verdict about nothing. So every
route in applies this one rule before analysis: the DIMSE C-STORE handler
(through ``intake``), ``POST /predict`` and ``/batch-predict``, and
``lungnode predict``. Keeping it in one place keeps the routes from drifting.

The rule, from the CT Image IOD (PS3.3 A.3) and Enhanced CT Image IOD
(PS3.3 A.38):

- the SOP Class is CT Image Storage or Enhanced CT Image Storage (PS3.4 B.5);
- Modality (0008,0060), when present, is ``CT`` (PS3.3 C.8.2.1.1.1 and
  C.8.15.2.1.1 require it for these IODs);
- one sample per pixel, MONOCHROME1 or MONOCHROME2 (PS3.3 C.8.2.1.1.2), so
  that the Modality LUT gives HU.

PNG and JPEG pictures carry no header to judge; they are read as lung-window
pictures (``pipeline.analyze.load_picture``) and this rule does not apply.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID

from lungnode.errors import DecodeError, NotCTError

#: The SOP classes this node analyses (PS3.4 B.5): CT Image and Enhanced CT Image.
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
ACCEPTED_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)

#: The attributes the rule reads; a header read with only these is enough.
RULE_KEYWORDS = ("SOPClassUID", "Modality", "SamplesPerPixel", "PhotometricInterpretation")

_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})


def why_not_ct(dataset: Dataset) -> str | None:
    """None when ``dataset`` is a CT image in HU; otherwise why not, naming its modality.

    The reason starts with the modality, so that it survives the 64 characters
    of a DIMSE Error Comment (PS3.7 C.4.2.1.6).
    """
    return why_not_ct_values(
        sop_class=str(dataset.get("SOPClassUID") or _media_sop_class(dataset)),
        modality=str(dataset.get("Modality") or ""),
        samples=dataset.get("SamplesPerPixel"),
        photometric=str(dataset.get("PhotometricInterpretation") or ""),
    )


def why_not_ct_values(
    *, sop_class: str, modality: str, samples: object, photometric: str
) -> str | None:
    """:func:`why_not_ct` on the four attribute values it reads (intake's fast path)."""
    modality = modality.strip() or "unknown"
    sop_class = UID(sop_class)
    if sop_class not in ACCEPTED_SOP_CLASSES:
        name = sop_class.name if sop_class else "no SOP Class UID"
        if modality == "CT":
            return (
                f"SOP Class {name} is not CT Image Storage; only CT images have the "
                "Hounsfield units the model reads"
            )
        return (
            f"Modality {modality} is not CT ({name}); only CT images have the "
            "Hounsfield units the model reads"
        )
    if modality != "CT":
        return (
            f"Modality {modality} is not CT, though the SOP Class is {sop_class.name}; "
            "only CT images have the Hounsfield units the model reads"
        )
    photometric = photometric.strip()
    if (samples not in (None, "") and str(samples).strip() != "1") or (
        photometric and photometric not in _MONOCHROME
    ):
        return (
            f"Modality CT but {samples} samples per pixel ({photometric or 'unknown'}): "
            "a colour image has no Hounsfield units"
        )
    return None


def require_ct(dataset: Dataset, name: str = "") -> None:
    """Raise :class:`NotCTError` unless ``dataset`` is a CT image in HU (``why_not_ct``)."""
    reason = why_not_ct(dataset)
    if reason is not None:
        modality = str(dataset.get("Modality") or "").strip() or None
        raise NotCTError(f"{name}: {reason}" if name else reason, modality=modality)


def require_ct_file(path: Path, name: str | None = None) -> None:
    """``require_ct`` on the header of a DICOM file; the pixel data is not read.

    ``name`` starts the message (default: the file's name; "" for none).

    Raises:
        NotCTError: the file is not a CT image in HU.
        DecodeError: the file is not readable DICOM.
    """
    path = Path(path)
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=list(RULE_KEYWORDS))
        # Values are converted when first read: a damaged one fails in the rule.
        require_ct(header, path.name if name is None else name)
    except (NotCTError, MemoryError):
        raise
    except Exception as exc:  # a damaged file can fail anywhere in the parser
        raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from exc


def _media_sop_class(dataset: Dataset) -> str:
    """Media Storage SOP Class UID (PS3.10 7.1), for a data set that lacks its own."""
    meta = getattr(dataset, "file_meta", None)
    return str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
