"""The exception hierarchy: one base class, one subclass per failure kind.

Every error lungnode raises on purpose derives from :class:`LungnodeError`, so
a boundary (the SCP handler, the API, the CLI) can turn it into a DICOM status,
a JSON error or an exit code without catching everything.
"""

from __future__ import annotations

import errno

from lungnode.addresses import host_port


class LungnodeError(Exception):
    """Base class of every error lungnode raises on purpose."""


class ConfigError(LungnodeError, ValueError):
    """The settings are invalid or unsafe; the message says which and why."""


class ListenError(LungnodeError):
    """A port the node must listen on cannot be had; the message says which, why, and
    the setting that chooses another."""


#: Why a bind fails, as a PACS admin would want it said.
_BIND_REASONS = {
    errno.EADDRINUSE: "another program listens there (is a node already running?)",
    errno.EACCES: "ports below 1024 need privileges",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
}


def listen_error(exc: OSError, service: str, host: str, port: int, setting: str) -> ListenError:
    """The :class:`ListenError` of a failed bind of ``service`` to ``host:port``."""
    why = _BIND_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
    return ListenError(
        f"cannot listen for {service} on {host_port(host, port)}: {why}; "
        f"choose another port with {setting}"
    )


class IntakeError(LungnodeError):
    """A received instance cannot be accepted; ``status`` is the DIMSE status to answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class BundleError(LungnodeError, ValueError):
    """A model bundle is missing, malformed, untrusted or does not match its manifest."""


class DecodeError(LungnodeError, ValueError):
    """Pixel data cannot be read or turned into HU; the message says which file and why."""


class NotCTError(LungnodeError):
    """A DICOM image that is not CT, or has no Hounsfield units: it is never analysed.

    The rule is ``dicom.modality.why_not_ct``; ``modality`` is the image's
    Modality, None when it has none.
    """

    def __init__(self, message: str, modality: str | None = None) -> None:
        super().__init__(message)
        self.modality = modality


class ImageRefused(LungnodeError):
    """An uploaded image that is not analysed: not CT, unreadable, too small, or the
    model could not classify it. ``code`` and ``details`` are what the API answers
    (with 422); a batch item keeps them as its error."""

    def __init__(self, code: str, message: str, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class JobNotRunning(LungnodeError):
    """A job's results came after its row left ``running`` (a stop gave it up); not recorded."""


class ItemNotRunning(LungnodeError):
    """A batch item's result came after its attempt ended (its lease ran out and it was
    given up, or another worker has it now); not recorded."""


class StorageFull(LungnodeError):
    """The storage (or the database) has no room for what must be written now.

    Not a fault of the series, nor of the node's code: a job that meets it waits for
    space and runs again, without spending one of its attempts (``pipeline.jobs``).
    ``needed_bytes`` is how much the write wanted, when known.
    """

    def __init__(self, message: str, needed_bytes: int | None = None) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes


#: errno values of a write refused for want of space: the device, or the user's quota.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: SQLite's SQLITE_FULL (its database or journal cannot grow); PostgreSQL's disk_full.
_SQLITE_FULL = 13
_POSTGRESQL_DISK_FULL = "53100"


def storage_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, says the storage is full.

    A write's ``OSError`` with ENOSPC or EDQUOT, a :class:`StorageFull`, SQLite's
    "database or disk is full" and PostgreSQL's ``disk_full`` (SQLAlchemy raises
    the driver's error as the cause of its own).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageFull):
            return True
        if isinstance(current, OSError) and current.errno in _NO_SPACE_ERRNOS:
            return True
        if getattr(current, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if getattr(current, "sqlstate", None) == _POSTGRESQL_DISK_FULL:
            return True
        current = current.__cause__ or current.__context__
    return False
