"""The exception hierarchy.

Every error lungnode raises on purpose derives from :class:`LungnodeError`, so
callers at a boundary (the SCP handler, the API, the CLI) can turn it into a
DICOM status, a JSON error or an exit code without catching everything.
"""


class LungnodeError(Exception):
    """Base class of every deliberate lungnode error."""


class ConfigError(LungnodeError, ValueError):
    """The settings are invalid or unsafe (for example a default secret in production)."""


class IntakeError(LungnodeError):
    """A received instance cannot be stored; carries the DICOM status to answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class BundleError(LungnodeError, ValueError):
    """A model bundle is missing, corrupt or inconsistent with its manifest."""
