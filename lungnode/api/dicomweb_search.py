"""QIDO-RS query parameters and attribute matching (PS3.18 8.3.4, PS3.4 C.2.2.2), pure.

A search names attributes by keyword (``PatientID``) or tag (``00100020``),
plus ``includefield``, ``fuzzymatching``, ``limit`` and ``offset``. Matching
follows the DIMSE rules the DICOMweb ones are made of:

- an empty value matches everything (universal matching, C.2.2.2.3);
- a UID attribute takes a list of UIDs, separated by ``,`` or ``\\``
  (list of UID matching, C.2.2.2.2; PS3.18 8.3.4.6.1);
- a date or time takes ``a-b``, ``-b`` or ``a-`` (range matching, C.2.2.2.5);
- a string may hold ``*`` and ``?`` (wild card matching, C.2.2.2.4); person
  names match without regard to case;
- anything else matches its value exactly (single value matching, C.2.2.2.1);
- an attribute with several values matches when one of them does.

Not handled here: sequence matching and fuzzy matching (``fuzzymatching=true``
is accepted and searches as if false, which PS3.18 8.3.4.5 allows).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

#: The most results one search answers; a client pages with ``offset`` for more.
MAX_LIMIT = 1000

_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


class Level(enum.Enum):
    """The level a search answers at (PS3.18 10.6.1.1)."""

    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


#: Attributes each level matches on (PS3.18 Table 10.6.1-5, those lungnode has).
MATCHING_KEYS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "StudyID",
        "StudyDescription",
    ),
    Level.SERIES: ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"),
    Level.INSTANCE: ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}

#: Attributes each level returns (PS3.18 Tables 10.6.3-3, -4 and -5, those lungnode has).
RETURN_KEYS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: (
        "SpecificCharacterSet",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "InstanceAvailability",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "TimezoneOffsetFromUTC",
        "RetrieveURL",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "SpecificCharacterSet",
        "Modality",
        "TimezoneOffsetFromUTC",
        "SeriesDescription",
        "RetrieveURL",
        "SeriesInstanceUID",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
        "StudyInstanceUID",
    ),
    Level.INSTANCE: (
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceAvailability",
        "TimezoneOffsetFromUTC",
        "RetrieveURL",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
    ),
}

#: ``Modality`` in a search of studies means ``ModalitiesInStudy`` (what many clients send).
_STUDY_ALIASES = {"Modality": "ModalitiesInStudy"}


@dataclass(frozen=True)
class Matcher:
    """One query key: the attribute's keyword, its VR, and the value to match."""

    keyword: str
    vr: str
    value: str

    def matches(self, dataset: Dataset) -> bool:
        if self.value == "":
            return True
        if self.keyword not in dataset:
            return False
        element = dataset.data_element(self.keyword)
        if element is None or element.is_empty:
            return False
        values = element.value if element.VM > 1 else [element.value]
        return any(self._matches_one(str(v)) for v in values)

    def _matches_one(self, candidate: str) -> bool:
        if self.vr == "UI":
            return candidate in _uid_list(self.value)
        if self.vr in ("DA", "TM", "DT") and "-" in self.value:
            low, _, high = self.value.partition("-")
            return (not low or candidate >= low) and (not high or candidate[: len(high)] <= high)
        if self.vr == "IS":
            return candidate.strip() == self.value.strip() or _int(candidate) == _int(self.value)
        if "*" in self.value or "?" in self.value:
            flags = re.IGNORECASE if self.vr == "PN" else 0
            return _wildcard(self.value, flags).fullmatch(candidate) is not None
        if self.vr == "PN":
            return candidate.casefold() == self.value.casefold()
        return candidate == self.value


@dataclass(frozen=True)
class Search:
    """A parsed query string: keys to match, what to include, and the page."""

    matchers: tuple[Matcher, ...] = ()
    include: tuple[str, ...] = ()
    include_all: bool = False
    limit: int = MAX_LIMIT
    offset: int = 0

    def matches(self, dataset: Dataset) -> bool:
        return all(m.matches(dataset) for m in self.matchers)

    def keys(self) -> set[str]:
        return {m.keyword for m in self.matchers if m.value != ""}


def _uid_list(value: str) -> list[str]:
    return [uid.strip() for uid in re.split(r"[,\\]", value) if uid.strip()]


def _int(value: str) -> int | None:
    try:
        return int(value.strip())
    except ValueError:
        return None


def _wildcard(pattern: str, flags: int) -> re.Pattern[str]:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, flags | re.DOTALL)


def attribute_keyword(name: str) -> str:
    """The keyword of an attribute named by keyword or by tag (``0020000D``).

    Raises ``ValueError`` when it names no attribute of the data dictionary.
    """
    if _TAG.match(name):
        keyword = keyword_for_tag(Tag(int(name, 16)))
        if keyword:
            return keyword
        raise ValueError(f"{name} is not a tag of the DICOM data dictionary")
    if tag_for_keyword(name) is not None:
        return name
    raise ValueError(f"{name!r} is neither a DICOM attribute keyword nor a tag")


def _check_value(keyword: str, vr: str, value: str) -> None:
    if value == "":
        return
    if vr == "UI":
        if not all(_UID.match(uid) for uid in _uid_list(value)) or not _uid_list(value):
            raise ValueError(f"{keyword}: {value!r} is not a UID or a list of UIDs")
    elif vr in ("DA", "TM"):
        pattern = _DATE if vr == "DA" else _TIME
        parts = value.split("-") if "-" in value else [value]
        if len(parts) > 2 or not all(p == "" or pattern.match(p) for p in parts):
            form = "YYYYMMDD" if vr == "DA" else "HHMMSS"
            raise ValueError(f"{keyword}: {value!r} is not a {form} value or range")
        if len(parts) == 2 and parts[0] and parts[1] and parts[0] > parts[1]:
            raise ValueError(f"{keyword}: the range {value!r} ends before it starts")
        if parts == ["", ""]:
            raise ValueError(f"{keyword}: '-' is not a range")
    elif vr == "IS" and _int(value) is None:
        raise ValueError(f"{keyword}: {value!r} is not an integer")


def _page_number(name: str, values: Sequence[str], low: int, high: int | None) -> int:
    if len(values) != 1:
        raise ValueError(f"{name} may be given once")
    try:
        number = int(values[0])
    except ValueError:
        raise ValueError(f"{name}: {values[0]!r} is not an integer") from None
    if number < low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}, not {number}")
    return number


def matchable_keys(*levels: Level) -> list[str]:
    """The keys a search matches on: those of each level it spans. A search scoped by
    its path to a study (or a series) spans only the levels below it (PS3.18 10.6.1.2)."""
    return [key for level in levels for key in MATCHING_KEYS[level]]


def parse_search(arguments: Mapping[str, Sequence[str]], allowed: Iterable[str]) -> Search:
    """The search a query string asks for; ``allowed`` are the keys it may match on.

    Raises ``ValueError`` with the reason for a parameter that is not a DICOM
    attribute, an attribute the level does not match on, a malformed value, or a
    bad ``limit``/``offset``.
    """
    allowed_keys = set(allowed)
    matchers: list[Matcher] = []
    include: list[str] = []
    include_all = False
    limit, offset = MAX_LIMIT, 0
    for name, values in arguments.items():
        if name == "includefield":
            for value in values:
                for item in filter(None, (v.strip() for v in value.split(","))):
                    if item == "all":
                        include_all = True
                    else:
                        include.append(attribute_keyword(item))
            continue
        if name == "fuzzymatching":
            if any(v not in ("true", "false") for v in values):
                raise ValueError("fuzzymatching must be true or false")
            continue
        if name == "limit":
            limit = _page_number(name, values, 1, MAX_LIMIT)
            continue
        if name == "offset":
            offset = _page_number(name, values, 0, None)
            continue
        keyword = attribute_keyword(name)
        if keyword not in allowed_keys:
            keyword = _STUDY_ALIASES.get(keyword, keyword)
        if keyword not in allowed_keys:
            raise ValueError(
                f"{keyword} is not a query key of this search; it matches on: "
                + ", ".join(sorted(allowed_keys))
            )
        if len(values) != 1:
            raise ValueError(f"{keyword} may be given once")
        value = values[0]
        vr = dictionary_VR(keyword)
        _check_value(keyword, vr, value)
        matchers.append(Matcher(keyword, vr, value))
    return Search(tuple(matchers), tuple(dict.fromkeys(include)), include_all, limit, offset)
