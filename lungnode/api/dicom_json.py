"""Datasets as the DICOM JSON Model (PS3.18 Annex F), for QIDO-RS and WADO-RS metadata.

A search result carries chosen attributes only (:func:`selected_json`). A
metadata result carries the whole dataset without bulk data (PS3.18 10.4.1.1.2,
F.2.7): every top-level binary value longer than :data:`INLINE_MAX` bytes (Pixel
Data, Float Pixel Data, Encapsulated Document among them) becomes a
``BulkDataURI`` where it can be retrieved; shorter ones stay ``InlineBinary``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import BYTES_VR

#: The longest binary value written inline, in bytes (base64 in the JSON).
INLINE_MAX = 1024

#: The media type of a DICOM JSON body (PS3.18 8.7.3.2).
DICOM_JSON = "application/dicom+json"


def _json_key(element: DataElement) -> str:
    return f"{int(element.tag):08X}"


def selected_json(record: Dataset, keywords: Iterable[str], include_all: bool) -> dict[str, Any]:
    """The attributes ``keywords`` of ``record`` (all of them with ``include_all``).

    An attribute the record lacks is returned empty, as a C-FIND response returns
    a requested key it has no value for (PS3.4 C.2.2.1.3).
    """
    chosen = Dataset()
    if include_all:
        for element in record:
            chosen.add(element)
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None or tag in chosen:
            continue
        if tag in record:
            chosen.add(record[tag])
        else:
            chosen.add(DataElement(tag, dictionary_VR(keyword), None))
    return chosen.to_json_dict()


def metadata_json(dataset: Dataset, bulk_data_uri: Callable[[int], str]) -> dict[str, Any]:
    """The dataset without bulk data; ``bulk_data_uri(tag)`` names where a value is."""
    result: dict[str, Any] = {}
    for element in dataset:
        if element.VR in BYTES_VR and not element.is_empty and len(element.value) > INLINE_MAX:
            result[_json_key(element)] = {
                "vr": element.VR,
                "BulkDataURI": bulk_data_uri(int(element.tag)),
            }
        else:
            result[_json_key(element)] = element.to_json_dict(None, 0)
    return result
