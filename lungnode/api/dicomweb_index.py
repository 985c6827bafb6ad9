"""The node's result objects as DICOMweb sees them: studies, series and instances.

What exists comes from the rows (``db.result_index``), less any object whose
file is gone. What a search returns about an object comes from its file's
header, read on demand and kept in a small cache keyed by the file's path, size
and modification time: a search of studies reads one header per series (the
first instance's, for the study and series attributes), never every file.

Access is in one place: :func:`read_access`, any logged-in user (results are
DICOM-originated, which every role may see, as in ``/history``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import BYTES_VR

from lungnode.api import context
from lungnode.api.auth import roles
from lungnode.db.result_index import StoredResult, stored_results

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Headers kept in memory, per process.
HEADER_CACHE_SIZE = 512
#: Values longer than this are left on disk when a header is read.
_DEFER_BYTES = 4096


def read_access(view: F) -> F:
    """Who may read the DICOMweb resources: any logged-in user (401 without a token)."""
    return roles()(view)


class _HeaderCache:
    """Recently read headers (without pixel data), by path, size and mtime."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._headers: OrderedDict[tuple[str, int, int], Dataset] = OrderedDict()

    def get(self, path: Path) -> Dataset | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            header = self._headers.get(key)
            if header is not None:
                self._headers.move_to_end(key)
                return header
        try:
            header = dcmread(path, stop_before_pixels=True, defer_size=_DEFER_BYTES)
        except (OSError, InvalidDicomError) as exc:
            logger.warning("result file unreadable, left out: %s (%s)", path.name, exc)
            return None
        with self._lock:
            self._headers[key] = header
            while len(self._headers) > self.size:
                self._headers.popitem(last=False)
        return header


_headers = _HeaderCache(HEADER_CACHE_SIZE)


def header(path: Path) -> Dataset | None:
    """The header of a result file, or None when it is gone or not DICOM."""
    return _headers.get(path)


@dataclass
class SeriesEntry:
    study_instance_uid: str
    series_instance_uid: str
    instances: list[StoredResult] = field(default_factory=list)


@dataclass
class StudyEntry:
    study_instance_uid: str
    series: dict[str, SeriesEntry] = field(default_factory=dict)

    @property
    def instances(self) -> list[StoredResult]:
        return [i for s in self.series.values() for i in s.instances]


def studies(study_uids: Collection[str] | None = None) -> list[StudyEntry]:
    """The studies with result objects on disk, newest analysis first."""
    with context.reading() as session:
        results = stored_results(session, context.settings().storage_dir, study_uids)
    entries: dict[str, StudyEntry] = {}
    for result in results:
        if not result.path.is_file():
            continue
        study = entries.setdefault(result.study_instance_uid, StudyEntry(result.study_instance_uid))
        series = study.series.setdefault(
            result.series_instance_uid,
            SeriesEntry(result.study_instance_uid, result.series_instance_uid),
        )
        series.instances.append(result)
    return list(entries.values())


def find_study(study_uid: str) -> StudyEntry | None:
    found = studies([study_uid])
    return found[0] if found else None


# -- the attributes of each level -----------------------------------------------------


def _put(record: Dataset, keyword: str, value: Any) -> None:
    """Set an attribute as a new element (never changing a cached header's element)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    record[tag] = DataElement(tag, dictionary_VR(keyword), value)


def _copy_header(source: Dataset | None) -> Dataset:
    """The top-level attributes of a header, less binary values (a shallow copy)."""
    record = Dataset()
    if source is None:
        return record
    for tag in source.keys():
        raw = source.get_item(tag)
        if raw is None or raw.VR in BYTES_VR:
            continue
        record[tag] = source[tag]
    return record


def instance_record(result: StoredResult, base_url: str) -> Dataset:
    """An instance's attributes: its header, and what the index knows for certain."""
    record = _copy_header(header(result.path))
    _put(record, "StudyInstanceUID", result.study_instance_uid)
    _put(record, "SeriesInstanceUID", result.series_instance_uid)
    _put(record, "SOPInstanceUID", result.sop_instance_uid)
    _put(record, "SOPClassUID", result.sop_class_uid)
    _put(record, "InstanceAvailability", "ONLINE")
    _put(record, "RetrieveURL", instance_url(base_url, result))
    return record


def series_record(series: SeriesEntry, base_url: str) -> Dataset:
    """A series' attributes: its first instance's header, and the instance count."""
    first = series.instances[0]
    record = _copy_header(header(first.path))
    _put(record, "StudyInstanceUID", series.study_instance_uid)
    _put(record, "SeriesInstanceUID", series.series_instance_uid)
    _put(record, "NumberOfSeriesRelatedInstances", len(series.instances))
    _put(record, "InstanceAvailability", "ONLINE")
    url = f"{base_url}/studies/{series.study_instance_uid}/series/{series.series_instance_uid}"
    _put(record, "RetrieveURL", url)
    return record


def study_record(study: StudyEntry, base_url: str) -> Dataset:
    """A study's attributes: the first result's header, the modalities of its series
    (one header each) and the counts."""
    series = list(study.series.values())
    record = _copy_header(header(series[0].instances[0].path))
    modalities: list[str] = []
    for entry in series:
        first = header(entry.instances[0].path)
        modality = str(first.get("Modality", "")) if first is not None else ""
        if modality and modality not in modalities:
            modalities.append(modality)
    _put(record, "StudyInstanceUID", study.study_instance_uid)
    _put(record, "ModalitiesInStudy", modalities)
    _put(record, "NumberOfStudyRelatedSeries", len(series))
    _put(record, "NumberOfStudyRelatedInstances", len(study.instances))
    _put(record, "InstanceAvailability", "ONLINE")
    _put(record, "RetrieveURL", f"{base_url}/studies/{study.study_instance_uid}")
    return record


def instance_url(base_url: str, result: StoredResult) -> str:
    return (
        f"{base_url}/studies/{result.study_instance_uid}/series/{result.series_instance_uid}"
        f"/instances/{result.sop_instance_uid}"
    )
