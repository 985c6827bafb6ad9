"""Durable instance write and registration.

The SCP hands every received C-STORE data set here. :meth:`Intake.store`
validates it, writes it atomically (temporary file, fsync, rename, fsync of the
directory) under ``incoming/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` and records
the instance row. Only when both are durable does it return, and only then does
the SCP answer 0x0000. Anything else becomes an :class:`~lungnode.errors.IntakeError`
carrying the DICOM status to answer (PS3.4 Table B.2-1 and GG.4-1).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from lungnode.dicom.instance_header import is_valid_uid as is_valid_uid
from lungnode.dicom.instance_header import read_instance_header
from lungnode.dicom.modality import ACCEPTED_SOP_CLASSES as ACCEPTED_SOP_CLASSES
from lungnode.dicom.modality import why_not_ct
from lungnode.dicom.page_cache import RecentFiles
from lungnode.domain import InstanceFacts
from lungnode.errors import IntakeError, storage_full

logger = logging.getLogger(__name__)

# PS3.4 Table B.2-1, C-STORE status codes.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
#: Failure codes in the 0xCxxx range ("cannot understand") that say which check failed.
STATUS_MISSING_ATTRIBUTE = 0xC001
STATUS_INVALID_UID = 0xC002
STATUS_PIXEL_DATA_INVALID = 0xC003
#: STOW-RS to a study's URL (PS3.18 10.5.1): the instance belongs to another study. An
#: implementation-specific code in the "cannot understand" range (PS3.18 I.2.2 allows
#: them), the value other archives answer.
STATUS_STUDY_MISMATCH = 0xC409

_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def read_instance(encoded: bytes) -> tuple[InstanceFacts, str | None]:
    """(facts, why it is not a CT image or None) of a received data set with file meta.

    Plain uncompressed slices are read by ``dicom.instance_header``; everything
    else, and anything that path is not sure of, by pydicom (:func:`parse_instance`).
    Raises IntakeError when the instance is unusable.
    """
    fast = read_instance_header(encoded)
    if fast is not None:
        return fast
    dataset, facts = parse_instance(encoded)
    with values_must_decode():
        return facts, why_not_ct(dataset)


def parse_instance(encoded: bytes) -> tuple[Dataset, InstanceFacts]:
    """Parse and check a received data set (with file meta); raise IntakeError if unusable."""
    try:
        # Values stay raw until used: the instance is stored as received, and only the
        # attributes read below must decode. Truncation shows in the pixel data check.
        dataset = dcmread(BytesIO(encoded), force=False)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        raise IntakeError(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set: {exc}") from exc
    except Exception as exc:  # a malformed stream can fail anywhere inside the parser
        raise IntakeError(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set: {exc!r}") from exc
    with values_must_decode():
        return dataset, _facts_of(dataset)


@contextmanager
def values_must_decode() -> Iterator[None]:
    """pydicom converts a value when it is first read: one that does not convert (an
    unknown VR, a bad length, a bad character) is the sender's error, not ours."""
    try:
        yield
    except IntakeError:
        raise
    except Exception as exc:
        raise IntakeError(STATUS_CANNOT_UNDERSTAND, f"cannot read data set: {exc!r}") from exc


def _facts_of(dataset: Dataset) -> InstanceFacts:
    missing = [kw for kw in _REQUIRED if not dataset.get(kw)]
    if missing:
        raise IntakeError(STATUS_MISSING_ATTRIBUTE, f"missing required attributes: {missing}")
    for keyword in _REQUIRED:
        if not is_valid_uid(str(dataset[keyword].value)):
            raise IntakeError(STATUS_INVALID_UID, f"{keyword} is not a valid UID")
    transfer_syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "")))
    if not transfer_syntax.is_transfer_syntax:
        # A C-STORE's comes from the negotiated context; a file's (reconcile) may be damaged.
        raise IntakeError(STATUS_CANNOT_UNDERSTAND, "the Transfer Syntax UID is not one")
    _check_pixel_data(dataset, transfer_syntax)
    return InstanceFacts(
        study_instance_uid=str(dataset.StudyInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        sop_class_uid=str(dataset.SOPClassUID),
        transfer_syntax_uid=str(transfer_syntax),
        modality=_text(dataset, "Modality"),
        series_number=_integer(dataset, "SeriesNumber"),
        instance_number=_integer(dataset, "InstanceNumber"),
        number_of_frames=_integer(dataset, "NumberOfFrames") or 1,
        position=_floats(dataset, "ImagePositionPatient", 3),
        orientation=_floats(dataset, "ImageOrientationPatient", 6),
        declared_count=_integer(dataset, "ImagesInAcquisition"),
    )


def _check_pixel_data(dataset: Dataset, transfer_syntax: UID) -> None:
    """An image without complete pixel data cannot be analysed: refuse it now (PS3.5 8.2)."""
    if "PixelData" not in dataset:
        raise IntakeError(STATUS_MISSING_ATTRIBUTE, "missing required attributes: ['PixelData']")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if dataset.get(keyword) in (None, ""):
            raise IntakeError(
                STATUS_MISSING_ATTRIBUTE, f"missing required attributes: [{keyword!r}]"
            )
    pixel_data = dataset.PixelData
    if transfer_syntax.is_encapsulated:
        try:
            fragments = sum(
                1 for _ in generate_fragments(pixel_data[8 + _bot_length(pixel_data) :])
            )
        except Exception as exc:
            raise IntakeError(STATUS_PIXEL_DATA_INVALID, f"encapsulated pixel data: {exc}") from exc
        if fragments == 0:
            raise IntakeError(STATUS_PIXEL_DATA_INVALID, "encapsulated pixel data has no fragment")
        return
    frames = _integer(dataset, "NumberOfFrames") or 1
    samples = _integer(dataset, "SamplesPerPixel") or 1
    expected_bits = int(dataset.Rows) * int(dataset.Columns) * samples * frames
    expected = expected_bits * int(dataset.BitsAllocated) // 8
    if len(pixel_data) < expected:
        raise IntakeError(
            STATUS_PIXEL_DATA_INVALID,
            f"pixel data is {len(pixel_data)} bytes, expected {expected}: truncated",
        )


def _bot_length(pixel_data: bytes) -> int:
    """Length of the Basic Offset Table item that starts encapsulated pixel data (PS3.5 A.4)."""
    if len(pixel_data) < 8 or pixel_data[:4] != b"\xfe\xff\x00\xe0":
        raise ValueError("encapsulated pixel data does not start with an item tag")
    return int.from_bytes(pixel_data[4:8], "little")


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    return str(value) if value not in (None, "") else None


def _integer(dataset: Dataset, keyword: str) -> int | None:
    value = dataset.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _floats(dataset: Dataset, keyword: str, count: int) -> list[float] | None:
    value = dataset.get(keyword)
    try:
        numbers = [float(v) for v in value] if value is not None else []
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def instance_path(root: Path, facts: InstanceFacts) -> Path:
    """``<root>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``; the UIDs were validated in parsing."""
    return (
        root
        / facts.study_instance_uid
        / facts.series_instance_uid
        / f"{facts.sop_instance_uid}.dcm"
    )


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _DirectoryState:
    """One directory's fsyncs: how many were asked for, and up to which one is durable."""

    changed: threading.Condition
    requested: int = 0
    durable: int = 0
    running: bool = False
    waiting: int = 0


class DirectorySyncs:
    """fsync of a directory, shared by every thread that needs it at the same moment.

    A thread that renamed a file into a directory needs one fsync of the directory
    that *starts* after its rename. When several associations store into the same
    series folder at once, one fsync in progress cannot count for a rename that
    came after it started, but the next one counts for every rename made before it
    starts: so while one thread syncs, the others queue, and the next sync, run by
    one of them, makes all their renames durable together (group commit). A single
    writer pays exactly one fsync per call, as before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[Path, _DirectoryState] = {}

    def sync(self, directory: Path) -> None:
        """Return once every entry changed in ``directory`` before this call is durable."""
        with self._lock:
            state = self._states.get(directory)
            if state is None:
                state = self._states[directory] = _DirectoryState(threading.Condition(self._lock))
            state.requested += 1
            ticket = state.requested
            state.waiting += 1
            try:
                while state.durable < ticket:
                    if state.running:
                        state.changed.wait()
                        continue
                    self._run(directory, state)
            finally:
                state.waiting -= 1
                if state.waiting == 0 and not state.running:
                    del self._states[directory]

    def _run(self, directory: Path, state: _DirectoryState) -> None:
        """One fsync covering every request made so far; called and returns with the lock."""
        state.running = True
        covers = state.requested
        self._lock.release()
        try:
            _fsync_directory(directory)
        finally:
            self._lock.acquire()
            state.running = False
            state.changed.notify_all()
        state.durable = max(state.durable, covers)


_directory_syncs = DirectorySyncs()

#: Directories this process made or found (a stat per instance saved); an entry is
#: dropped again when a write finds its directory gone (removed by housekeeping).
#: One per series folder: forgotten all at once past the bound, so that a node
#: running for years does not keep every series it ever received.
_known_directories: set[Path] = set()
_KNOWN_DIRECTORIES_MAX = 10_000


def _make_directories(directory: Path) -> None:
    """Create the directory and make each new entry durable in its parent."""
    if directory in _known_directories:
        return
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        _directory_syncs.sync(path.parent)
    if len(_known_directories) >= _KNOWN_DIRECTORIES_MAX:
        _known_directories.clear()
    _known_directories.add(directory)


def _temporary_file(directory: Path) -> tuple[int, str]:
    """A new hidden ``.part`` file in ``directory`` (created, if need be)."""
    _make_directories(directory)
    try:
        return tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
    except FileNotFoundError:
        _known_directories.discard(directory)
        _make_directories(directory)
        return tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")


def _write_temporary(path: Path, payload: bytes) -> Path:
    """``payload`` in a durable temporary file beside ``path`` (``.*.part``); on any
    failure (a full disk) the temporary file is removed and the error raised."""
    fd, temporary = _temporary_file(path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` so that ``path`` is either absent or complete, even after a crash.

    The file is written under a temporary name and fsynced, renamed into place, and
    then its directory is fsynced (shared with concurrent writers: DirectorySyncs).
    """
    write_all_atomically([(path, payload)])


def write_all_atomically(files: Sequence[tuple[Path, bytes]]) -> None:
    """Write every file, or none of them: each to a durable temporary file first, and
    only when all are written, rename them into place.

    A failure while writing (a full disk) removes the temporary files written so far
    and raises: none of the set appears, and none of the room stays taken. A file
    that existed before is replaced whole, never left half-written.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, payload in files:
            staged.append((_write_temporary(path, payload), path))
        folders = list(dict.fromkeys(path.parent for _temporary, path in staged))
        while staged:
            temporary, path = staged[0]
            os.replace(temporary, path)
            staged.pop(0)
        # One fsync per folder makes every rename into it durable.
        for folder in folders:
            _directory_syncs.sync(folder)
    except BaseException:
        for temporary, _path in staged:
            temporary.unlink(missing_ok=True)
        raise


#: Records a stored instance; returns True when it was new. Raises on database failure.
Registrar = Callable[[InstanceFacts, Path, int, "int | None"], bool]


class Intake:
    """Validate, store durably, register. Thread-safe: one call per received instance."""

    def __init__(
        self,
        incoming_dir: Path,
        register: Registrar,
        min_free_bytes: int = 0,
        *,
        page_cache_bytes: int | None = None,
    ) -> None:
        self.incoming_dir = incoming_dir
        self.register = register
        self.min_free_bytes = min_free_bytes
        #: The instances written last that stay in the page cache (``dicom.page_cache``);
        #: None leaves the page cache to the kernel.
        self.recent = RecentFiles(page_cache_bytes) if page_cache_bytes is not None else None

    def store(
        self,
        encoded: bytes,
        association_id: int | None = None,
        *,
        study_instance_uid: str | None = None,
    ) -> InstanceFacts:
        """Store one data set (preamble, file meta and data set bytes); raise IntakeError.

        ``study_instance_uid``: the study the sender named (STOW-RS to
        ``/studies/{StudyInstanceUID}``); an instance of another one is refused.
        """
        facts, reason = read_instance(encoded)
        if study_instance_uid is not None and facts.study_instance_uid != study_instance_uid:
            raise IntakeError(STATUS_STUDY_MISMATCH, "the instance belongs to another study")
        # The same rule as every other route in (``dicom.modality``).
        if reason is not None:
            raise IntakeError(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, reason)
        path = instance_path(self.incoming_dir, facts)
        self._check_free_space(len(encoded))
        try:
            write_atomically(path, encoded)
        except OSError as exc:
            if storage_full(exc):
                raise IntakeError(STATUS_OUT_OF_RESOURCES, "storage is full") from exc
            raise IntakeError(STATUS_OUT_OF_RESOURCES, f"cannot write instance: {exc}") from exc
        if self.recent is not None:
            self.recent.add(path, len(encoded))
        try:
            self.register(facts, path, len(encoded), association_id)
        except Exception as exc:
            # The file stays: a resend or the start-up reconciliation registers it.
            # (It may be one stored and acknowledged before, written again by a resend.)
            if storage_full(exc):  # the database shares the full disk
                raise IntakeError(STATUS_OUT_OF_RESOURCES, "storage is full") from exc
            logger.exception("cannot record instance %s", facts.sop_instance_uid)
            raise IntakeError(STATUS_OUT_OF_RESOURCES, "cannot record instance") from exc
        return facts

    def _check_free_space(self, size: int) -> None:
        if self.min_free_bytes <= 0:
            return
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.incoming_dir).free
        if free - size < self.min_free_bytes:
            raise IntakeError(
                STATUS_OUT_OF_RESOURCES,
                f"storage is nearly full: {free // 2**20} MiB free, "
                f"{self.min_free_bytes // 2**20} MiB reserved",
            )


def reconcile(
    incoming_dir: Path,
    known_paths: set[str],
    register: Registrar,
    *,
    stale_part_seconds: float = 0.0,
    now: float | None = None,
) -> tuple[int, int]:
    """Register stored files the database does not know, e.g. after a crash between the
    file's rename and its row's commit. Returns (registered, unreadable).

    Leftover temporary files (``.*.part``) were never acknowledged: they are removed
    once untouched for ``stale_part_seconds``. On storage shared by several receiving
    processes another one may be writing a ``.part`` right now; a store in progress
    writes to it at least every ``network_timeout`` (silence longer than that aborts
    the association), so the node passes twice that.
    """
    registered = unreadable = 0
    if not incoming_dir.is_dir():
        return registered, unreadable
    cutoff = (time.time() if now is None else now) - stale_part_seconds
    for leftover in incoming_dir.glob("*/*/.*.part"):
        try:
            if leftover.stat().st_mtime <= cutoff:
                leftover.unlink()
        except FileNotFoundError:
            continue  # finished (renamed) or removed meanwhile
    for path in sorted(incoming_dir.glob("*/*/*.dcm")):
        if str(path) in known_paths:
            continue
        try:
            _dataset, facts = parse_instance(path.read_bytes())
            if path != instance_path(incoming_dir, facts):
                raise IntakeError(STATUS_CANNOT_UNDERSTAND, "file is not where its UIDs say")
            register(facts, path, path.stat().st_size, None)
            registered += 1
        except (IntakeError, OSError) as exc:
            logger.warning("cannot reconcile stored file %s: %s", path.name, exc)
            unreadable += 1
    return registered, unreadable
