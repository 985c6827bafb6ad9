"""QIDO-RS (PS3.18 10.6): search the node's result objects by study, series, instance.

Routes under ``/dicomweb``: ``/studies``, ``/series``, ``/instances``,
``/studies/{study}/series``, ``/studies/{study}/instances`` and
``/studies/{study}/series/{series}/instances``. Answers are
``application/dicom+json``: an array of datasets with the level's return
attributes (PS3.18 Tables 10.6.3-3 to -5, as far as the results carry them)
and those named by ``includefield``.

No match answers 204 No Content with an empty body, as PS3.18 8.3.4.4.1
requires (CP-2473 proposes 200 with an empty array instead; clients read both).
A query key that is not a DICOM attribute, or not one this search matches on,
or a malformed value, answers 400 in the API's JSON error shape.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from flask import Blueprint, Response, request
from pydicom.dataset import Dataset

from lungnode.api import dicomweb_index as index
from lungnode.api.dicom_json import DICOM_JSON, selected_json
from lungnode.api.dicomweb_media import accepts_json
from lungnode.api.dicomweb_search import (
    MATCHING_KEYS,
    RETURN_KEYS,
    Level,
    Search,
    matchable_keys,
    parse_search,
)
from lungnode.api.errors import APIError

dicomweb_query_blueprint = Blueprint("dicomweb_query", __name__)

#: Attributes the index knows without reading a file, per level.
_INDEX_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}


def base_url() -> str:
    """The DICOMweb root as the client reached it (``RetrieveURL``, ``BulkDataURI``)."""
    return request.url_root.rstrip("/") + "/dicomweb"


def not_acceptable(what: str) -> APIError:
    accept = request.headers.get("Accept", "")
    return APIError(406, "not_acceptable", f"cannot answer {what} as {accept!r}")


@dataclass(frozen=True)
class _Candidate:
    """One study, series or instance: what the index says of it, and its full record."""

    light: Dataset
    full: Callable[[], Dataset]


def _light(**uids: str) -> Dataset:
    dataset = Dataset()
    for keyword, value in uids.items():
        setattr(dataset, keyword, value)
    return dataset


def _search(levels: Sequence[Level]) -> Search:
    if not accepts_json(request.headers.get("Accept")):
        raise not_acceptable("a search")
    arguments = {name: request.args.getlist(name) for name in request.args}
    try:
        return parse_search(arguments, matchable_keys(*levels))
    except ValueError as exc:
        raise APIError(400, "bad_request", str(exc)) from None


def _answer(
    candidates: Iterable[_Candidate],
    search: Search,
    return_keys: Sequence[str],
    levels: Sequence[Level],
) -> Response:
    """Match, page and serialise. Keys the index knows are matched before any header
    is read; when none other is asked, only the page's headers are read.

    ``includefield=all`` returns every attribute of an instance's header at the
    instance level; above it, every attribute lungnode knows at the levels
    searched (a study or series has no header of its own to give all of).
    """
    by_index = [m for m in search.matchers if m.keyword in _INDEX_KEYS]
    by_header = [m for m in search.matchers if m.keyword not in _INDEX_KEYS]
    kept = (c for c in candidates if all(m.matches(c.light) for m in by_index))
    end = search.offset + search.limit
    if by_header:
        records = (c.full() for c in kept)
        matching = (r for r in records if all(m.matches(r) for m in by_header))
        page = list(itertools.islice(matching, search.offset, end))
    else:
        page = [c.full() for c in itertools.islice(kept, search.offset, end)]
    if not page:
        return Response(status=204)
    keys = [*return_keys, *search.keys(), *search.include]
    every_attribute = search.include_all and Level.INSTANCE in levels
    if search.include_all and not every_attribute:
        keys += [key for level in levels for key in (*RETURN_KEYS[level], *MATCHING_KEYS[level])]
    chosen = list(dict.fromkeys(keys))
    body = [selected_json(record, chosen, every_attribute) for record in page]
    return Response(json.dumps(body), status=200, content_type=DICOM_JSON)


def _study_candidates(entries: Iterable[index.StudyEntry]) -> Iterable[_Candidate]:
    url = base_url()
    for entry in entries:
        yield _Candidate(
            _light(StudyInstanceUID=entry.study_instance_uid),
            lambda entry=entry: index.study_record(entry, url),  # type: ignore[misc]
        )


def _series_candidates(entries: Iterable[index.StudyEntry]) -> Iterable[_Candidate]:
    url = base_url()
    for study in entries:
        for series in study.series.values():
            yield _Candidate(
                _light(
                    StudyInstanceUID=series.study_instance_uid,
                    SeriesInstanceUID=series.series_instance_uid,
                ),
                lambda series=series: index.series_record(series, url),  # type: ignore[misc]
            )


def _instance_candidates(
    entries: Iterable[index.StudyEntry], series_uid: str | None = None
) -> Iterable[_Candidate]:
    url = base_url()
    for study in entries:
        for series in study.series.values():
            if series_uid is not None and series.series_instance_uid != series_uid:
                continue
            for result in series.instances:
                yield _Candidate(
                    _light(
                        StudyInstanceUID=result.study_instance_uid,
                        SeriesInstanceUID=result.series_instance_uid,
                        SOPInstanceUID=result.sop_instance_uid,
                        SOPClassUID=result.sop_class_uid,
                    ),
                    lambda result=result: index.instance_record(result, url),  # type: ignore[misc]
                )


def _study_list(study_uid: str | None) -> list[index.StudyEntry]:
    return index.studies([study_uid] if study_uid is not None else None)


@dicomweb_query_blueprint.get("/studies")
@index.read_access
def search_studies() -> Response:
    """Search for studies (PS3.18 10.6.1, Study level)."""
    levels = [Level.STUDY]
    search = _search(levels)
    return _answer(_study_candidates(_study_list(None)), search, RETURN_KEYS[Level.STUDY], levels)


@dicomweb_query_blueprint.get("/series")
@index.read_access
def search_all_series() -> Response:
    """Search for series of every study; study attributes are returned too."""
    levels = [Level.STUDY, Level.SERIES]
    search = _search(levels)
    keys = [*RETURN_KEYS[Level.SERIES], *_STUDY_KEYS_BELOW]
    return _answer(_series_candidates(_study_list(None)), search, keys, levels)


@dicomweb_query_blueprint.get("/studies/<study>/series")
@index.read_access
def search_study_series(study: str) -> Response:
    """Search for the series of one study."""
    levels = [Level.SERIES]
    search = _search(levels)
    candidates = _series_candidates(_study_list(study))
    return _answer(candidates, search, RETURN_KEYS[Level.SERIES], levels)


@dicomweb_query_blueprint.get("/instances")
@index.read_access
def search_all_instances() -> Response:
    """Search for instances of every study; study and series attributes are returned too."""
    levels = [Level.STUDY, Level.SERIES, Level.INSTANCE]
    search = _search(levels)
    keys = [*RETURN_KEYS[Level.INSTANCE], *_STUDY_KEYS_BELOW, *_SERIES_KEYS_BELOW]
    return _answer(_instance_candidates(_study_list(None)), search, keys, levels)


@dicomweb_query_blueprint.get("/studies/<study>/instances")
@index.read_access
def search_study_instances(study: str) -> Response:
    """Search for the instances of one study; series attributes are returned too."""
    levels = [Level.SERIES, Level.INSTANCE]
    search = _search(levels)
    keys = [*RETURN_KEYS[Level.INSTANCE], *_SERIES_KEYS_BELOW]
    return _answer(_instance_candidates(_study_list(study)), search, keys, levels)


@dicomweb_query_blueprint.get("/studies/<study>/series/<series>/instances")
@index.read_access
def search_series_instances(study: str, series: str) -> Response:
    """Search for the instances of one series."""
    levels = [Level.INSTANCE]
    search = _search(levels)
    candidates = _instance_candidates(_study_list(study), series_uid=series)
    return _answer(candidates, search, RETURN_KEYS[Level.INSTANCE], levels)


#: The study attributes a search below the study level returns (PS3.18 10.6.3.3.2).
_STUDY_KEYS_BELOW = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDescription",
    "StudyInstanceUID",
)
#: The series attributes an instance search returns when the path names no series.
_SERIES_KEYS_BELOW = ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID")
