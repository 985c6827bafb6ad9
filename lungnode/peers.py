"""The remote application entities the node knows, as the settings declare them.

A peer may call the node, and may receive its results. Settings name each one
``NAME=AE@HOST:PORT`` (``LUNGNODE_PEERS``); the AE title is checked against the
standard's rules for the VR AE here, once, so nothing downstream sends a title
a PACS would refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, no backslash
# or control characters; leading and trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_PEER = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)=(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d+)$")


def validate_ae_title(value: str) -> str:
    """Return the AE title stripped, or raise ``ValueError`` (PS3.5 6.2, VR AE)."""
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(stripped):
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable characters, no backslash")
    return stripped


@dataclass(frozen=True)
class Peer:
    """A remote application entity the node knows: it may call us, and may receive results."""

    name: str
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``NAME=AE@HOST:PORT``."""
        match = _PEER.match(text.strip())
        if not match:
            raise ValueError(f"invalid peer {text!r}: expected NAME=AE@HOST:PORT")
        port = int(match["port"])
        if not 0 < port < 65536:
            raise ValueError(f"invalid peer {text!r}: port out of range")
        return cls(match["name"], validate_ae_title(match["ae"]), match["host"], port)

    def __str__(self) -> str:
        return f"{self.name}={self.ae_title}@{self.host}:{self.port}"
