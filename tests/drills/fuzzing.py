"""What the fuzzing drills share: byte mutations as a Hypothesis strategy, the
settings each target runs under, a per-example time bound, a log watch, and the
drill's one figures table.

A mutation is a short list of edits to a valid encoding (flip a bit, set a
byte, write a boundary value into a 16- or 32-bit field, insert, delete,
duplicate, truncate). The edits fall in the encoding's "hot" part (headers,
lengths, tags: everything before the pixel values) half of the time, since
that is where parsers make decisions. Hypothesis shrinks a failing example to
fewer, simpler edits, and prints it.

Short variant: derandomized (the same examples in every run, so CI is
repeatable) and no example database. Long variant (``LUNGNODE_DRILLS=long``):
random examples, with the failures it finds kept under ``build/hypothesis/``
(git-ignored), where the next long run replays them first.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.conftest import require_tool
from tests.drills.conftest import ROOT, Drill
from tests.support.synthetic import make_ct_series, write_series

# Hypothesis keeps caches (the constants of the code under test) besides any example
# database: under build/, not a .hypothesis folder in the repository.
set_hypothesis_home_dir(str(ROOT / "build" / "hypothesis"))

#: Boundary values written over 16- and 32-bit fields (lengths, counts, tags).
_WORDS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
#: Edits from simplest to most disruptive: Hypothesis shrinks towards the first.
_EDITS = ("flip", "byte", "word", "delete", "insert", "duplicate", "truncate")


#: Pixel Data (7FE0,0010) as encoded in little and big endian.
PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
#: The transfer syntaxes of the CT seeds (keywords, ``tests.support.synthetic_codecs``).
SEED_SYNTAXES = (
    "ExplicitVRLittleEndian",
    "ImplicitVRLittleEndian",
    "ExplicitVRBigEndian",
    "DeflatedExplicitVRLittleEndian",
    "RLELossless",
    "JPEGBaseline8Bit",
    "JPEGLosslessSV1",
    "JPEGLSLossless",
    "JPEG2000Lossless",
)


def hot_end(data: bytes) -> int | None:
    """Where the hot part of an encoding ends: just after its last Pixel Data tag; None
    (all of it is hot) when no tag shows, as in a deflated data set."""
    found = max(data.rfind(tag) for tag in PIXEL_DATA_TAGS)
    return None if found < 0 else min(len(data), found + 16)


@dataclass(frozen=True)
class Seed:
    """A valid CT instance to mutate: its file, bytes, and where its hot part ends."""

    name: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    data: bytes

    @property
    def hot(self) -> int | None:
        return hot_end(self.data)


def ct_seeds(directory: Path) -> list[Seed]:
    """Small synthetic CT instances: one per transfer syntax in ``SEED_SYNTAXES``, one
    unsigned with pixel padding, and one Enhanced CT of three frames."""
    require_tool("dcmcjpeg")  # the ISO 10918 seeds are encoded by DCMTK
    built = [
        (syntax, make_ct_series(1, rows=32, columns=32, transfer_syntax=syntax, seed=index))
        for index, syntax in enumerate(SEED_SYNTAXES)
    ]
    built.append(
        (
            "ExplicitVRLittleEndian, unsigned, padding",
            make_ct_series(1, rows=32, columns=32, signed=False, padding_value=0),
        )
    )
    built.append(
        (
            "Enhanced CT, 3 frames",
            make_ct_series(3, rows=16, columns=16, enhanced=True, per_frame_rescale=True),
        )
    )
    seeds = []
    for index, (name, datasets) in enumerate(built):
        (path,) = write_series(datasets, directory / f"seed{index}")
        ds = datasets[0]
        seeds.append(
            Seed(
                name,
                str(ds.SOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
                path,
                path.read_bytes(),
            )
        )
    return seeds


@dataclass(frozen=True)
class Edit:
    """One edit at offset ``at`` (taken modulo the current length); ``value`` is the
    bit, byte, word, length or bytes the edit uses."""

    kind: str
    at: int
    value: int | bytes = 0
    size: int = 0
    big_endian: bool = False

    def apply(self, data: bytearray) -> None:
        if not data:
            data += self.value if isinstance(self.value, bytes) else b"\0"
            return
        at = self.at % len(data)
        number = self.value if isinstance(self.value, int) else len(self.value)
        if self.kind == "flip":
            data[at] ^= 1 << (number % 8)
        elif self.kind == "byte":
            data[at] = number % 256
        elif self.kind == "word":
            word = number & ((1 << (8 * self.size)) - 1)
            data[at : at + self.size] = word.to_bytes(
                self.size, "big" if self.big_endian else "little"
            )
        elif self.kind == "delete":
            del data[at : at + number]
        elif self.kind == "insert":
            assert isinstance(self.value, bytes)
            data[at:at] = self.value
        elif self.kind == "duplicate":
            data[at:at] = data[at : at + number]
        else:  # truncate
            del data[at:]


def apply_edits(seed: bytes, edits: Sequence[Edit]) -> bytes:
    data = bytearray(seed)
    for edit in edits:
        edit.apply(data)
    return bytes(data)


@st.composite
def edit(draw: st.DrawFn, length: int, hot: int | None) -> Edit:
    """One edit of a ``length``-byte encoding, within ``[:hot]`` half of the time."""
    limit = max(1, length)
    if hot is not None and draw(st.booleans()):
        limit = max(1, min(hot, limit))
    at = draw(st.integers(0, limit - 1))
    kind = draw(st.sampled_from(_EDITS))
    if kind == "flip":
        return Edit(kind, at, draw(st.integers(0, 7)))
    if kind == "byte":
        return Edit(kind, at, draw(st.integers(0, 255)))
    if kind == "word":
        size = draw(st.sampled_from((2, 4)))
        return Edit(kind, at, draw(st.sampled_from(_WORDS)), size, draw(st.booleans()))
    if kind == "delete":
        return Edit(kind, at, draw(st.integers(1, 64)))
    if kind == "insert":
        return Edit(kind, at, draw(st.binary(min_size=1, max_size=32)))
    if kind == "duplicate":
        return Edit(kind, at, draw(st.integers(1, 256)))
    return Edit(kind, at)


def edits(length: int, hot: int | None = None, max_edits: int = 4) -> st.SearchStrategy[list[Edit]]:
    """1..``max_edits`` edits of a ``length``-byte encoding (:func:`apply_edits`).

    A failing example prints as its list of edits, which Hypothesis shrinks.
    """
    return st.lists(edit(length, hot), min_size=1, max_size=max_edits)


def fuzz_settings(drill: Drill, short: int, long: int, deadline_s: float) -> settings:
    """Hypothesis settings for one target: ``short`` or ``long`` examples (module doc).

    ``deadline_s`` is Hypothesis's deadline: an example slower than that fails as
    pathologically slow; a hang is cut short by :func:`time_bound` or socket timeouts.
    """
    database = DirectoryBasedExampleDatabase(ROOT / "build" / "hypothesis") if drill.long else None
    return settings(
        max_examples=drill.size(short, long),
        deadline=timedelta(seconds=deadline_s),
        derandomize=not drill.long,
        database=database,
        # Examples are generated, run and shrunk; nothing is "explained" (slow).
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
        # The targets share one app or node across examples, on purpose.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
        print_blob=True,
    )


class Hang(BaseException):
    """An example ran past its time bound. A BaseException, so that the code under
    test (which may catch Exception) cannot swallow it."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block runs longer than ``seconds``."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; the caller's deadline still holds
        return

    def _expired(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def escapes_fail() -> Iterator[None]:
    """Turn a BaseException that escaped the code under test (a :class:`Hang`, a Rust
    codec's panic) into a plain failure, which Hypothesis shrinks and prints; it stops
    at anything but an Exception otherwise."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except Exception:
        raise
    except BaseException as exc:
        raise AssertionError(f"{type(exc).__name__} escaped: {exc}") from exc


@dataclass
class Tally:
    """What one target ran: examples, outcomes by kind, the slowest example."""

    target: str
    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    slowest_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    wall_s: float = 0.0

    @contextlib.contextmanager
    def example(self) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.examples += 1
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)

    def saw(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def finish(self) -> None:
        self.wall_s = time.monotonic() - self.started


#: Rows of the drill's table, by target, in the order the targets ran.
_TALLIES: dict[str, Tally] = {}
#: Defects the fuzzing found and fixed, with their regression tests (docs/reliability.md).
FOUND_AND_FIXED: dict[str, str] = {}


def report(drill: Drill, tally: Tally) -> Path:
    """Add ``tally`` to the fuzzing table and (re)write it with ``drill.report``."""
    tally.finish()
    _TALLIES[tally.target] = tally
    lines = [
        "| target | examples | outcomes | slowest example | wall time |",
        "|---|---:|---|---:|---:|",
    ]
    for row in _TALLIES.values():
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(row.outcomes.items()))
        lines.append(
            f"| {row.target} | {row.examples} | {outcomes} | {row.slowest_s:.2f} s "
            f"| {row.wall_s:.1f} s |"
        )
    lines += [
        "",
        "Unhandled exceptions: 0. Hangs: 0. (A drill run that finds either fails.)",
    ]
    return drill.report("fuzz", "\n".join(lines))


class ErrorWatch(logging.Handler):
    """Records at ERROR and above from some loggers, less those ``acceptable`` allows.

    ``acceptable`` is a list of (logger name, function name) pairs, function name "*"
    for any, or (logger, function, start of the message) triples: the places that log
    at ERROR on purpose when a peer sends something malformed, and then recover.
    ``library_handlers`` (a prefix of handler names): an exception raised in one of the
    library's own event handlers (pynetdicom's ``standard_*`` logging handlers, which
    describe each PDU) is tolerated, with the traceback logged after it; one raised in
    any other handler (the node's) is not.
    """

    def __init__(
        self, acceptable: Sequence[tuple[str, ...]] = (), library_handlers: str | None = None
    ) -> None:
        super().__init__(level=logging.ERROR)
        self.acceptable = frozenset(acceptable)
        self.library_handlers = library_handlers
        self.unexpected: list[str] = []
        self.tolerated: dict[str, int] = {}
        self._traceback_follows: set[int | None] = set()
        self._lock_records = threading.Lock()

    def _tolerable(self, record: logging.LogRecord) -> bool:
        if {(record.name, record.funcName), (record.name, "*")} & self.acceptable:
            return True
        for rule in self.acceptable:
            if len(rule) == 3 and rule[:2] == (record.name, record.funcName):
                if record.getMessage().startswith(rule[2]):
                    return True
        if self.library_handlers is None or not record.name.endswith(".events"):
            return False
        if record.thread in self._traceback_follows and record.exc_info:
            self._traceback_follows.discard(record.thread)
            return True
        if f"handler '{self.library_handlers}" in record.getMessage():
            self._traceback_follows.add(record.thread)
            return True
        return False

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            if self._tolerable(record):
                key = f"{record.name}:{record.funcName}"
                self.tolerated[key] = self.tolerated.get(key, 0) + 1
                return
            text = f"{record.name}:{record.funcName}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
            self.unexpected.append(text)

    def take(self) -> list[str]:
        """The unexpected records since the last call."""
        with self._lock_records:
            taken, self.unexpected = self.unexpected, []
        return taken


@contextlib.contextmanager
def watching(names: Sequence[str], watch: ErrorWatch) -> Iterator[ErrorWatch]:
    """Attach ``watch`` to the named loggers, and catch exceptions that end a thread."""
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(watch)
    previous_hook = threading.excepthook

    def _thread_died(args: Any) -> None:
        watch.unexpected.append(
            f"thread {getattr(args.thread, 'name', '?')} died: "
            f"{args.exc_type.__name__}: {args.exc_value}"
        )

    threading.excepthook = _thread_died
    try:
        yield watch
    finally:
        threading.excepthook = previous_hook
        for logger in loggers:
            logger.removeHandler(watch)
