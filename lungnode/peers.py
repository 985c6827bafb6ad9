"""The remote application entities the node knows, as the settings declare them.

A peer may call the node, and may receive its results. Settings name each one
``NAME=AE@HOST:PORT`` (``LUNGNODE_PEERS``); the AE title is checked against the
standard's rules for the VR AE here, once, so nothing downstream sends a title
a PACS would refuse.

A DICOMweb destination (:class:`DicomwebPeer`, ``LUNGNODE_DICOMWEB_PEERS``) only
receives results, by STOW-RS; its URL, credentials and TLS settings are checked
here once too, and its secret is read once and never shown.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import SecretStr

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


# -- DICOMweb destinations (PS3.18) ---------------------------------------------------

DicomwebAuth = Literal["none", "bearer", "basic"]
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_OPTIONS = (
    "auth",
    "token",
    "token_file",
    "user",
    "password",
    "password_file",
    "verify",
    "ca",
    "max_instances",
    "max_mb",
)


@dataclass(frozen=True)
class DicomwebPeer:
    """A DICOMweb origin server that receives results by STOW-RS (PS3.18 10.5).

    Written ``NAME=BASE_URL[;option=value...]`` (``LUNGNODE_DICOMWEB_PEERS``), or as a
    TOML table with the same keys and ``name``/``url``. The base URL is the service
    root that ``/studies`` hangs off (PS3.18 8.2). Options: ``auth`` (none, bearer,
    basic; implied by the credentials given), ``token`` or ``token_file`` (bearer),
    ``user`` with ``password`` or ``password_file`` (HTTP Basic), ``verify`` (TLS
    certificate checks, default true), ``ca`` (a PEM CA bundle to verify against),
    ``max_instances`` and ``max_mb`` (the bounds of one request). A secret file is
    read once, here; the secret itself is never shown (:meth:`__str__`).
    """

    name: str
    url: str
    auth: DicomwebAuth = "none"
    username: str | None = None
    secret: SecretStr | None = None
    #: Where the secret was read from, if from a file (shown instead of the secret).
    secret_file: Path | None = None
    verify: bool = True
    ca_bundle: Path | None = None
    #: One STOW-RS request carries at most this many instances, and about this many bytes
    #: (one larger instance still goes alone).
    max_instances: int = 100
    max_bytes: int = 64 * 2**20

    @classmethod
    def parse(cls, text: str) -> DicomwebPeer:
        """Parse ``NAME=BASE_URL[;option=value...]``."""
        head, _, rest = text.strip().partition(";")
        name, sep, url = head.partition("=")
        if not sep:
            raise ValueError(f"invalid DICOMweb peer {text!r}: expected NAME=BASE_URL[;options]")
        options: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in rest.split(";"))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"invalid DICOMweb peer option {part!r}: expected key=value")
            options[key.strip()] = value.strip()
        return cls.from_options(name.strip(), url.strip(), options)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> DicomwebPeer:
        """From a TOML table: ``name``, ``url`` and the options of :meth:`parse`."""
        options = {
            str(key): str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in table.items()
        }
        name, url = options.pop("name", ""), options.pop("url", "")
        return cls.from_options(name, url, options)

    @classmethod
    def from_options(cls, name: str, url: str, options: Mapping[str, str]) -> DicomwebPeer:
        """Validate once: the name, the base URL, the credentials and the TLS settings."""
        if not _NAME.match(name):
            raise ValueError(f"invalid DICOMweb peer name {name!r}: letters, digits, _ . -")
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ValueError(
                f"DICOMweb peer {name}: unknown options {unknown}; known: {list(_OPTIONS)}"
            )
        base_url = _base_url(name, url)
        auth, username, secret, secret_file = _credentials(name, options)
        verify = _boolean(name, "verify", options.get("verify", "true"))
        ca_bundle = None
        if options.get("ca"):
            if not verify:
                raise ValueError(f"DICOMweb peer {name}: ca is set but verify is false")
            ca_bundle = Path(options["ca"]).expanduser().resolve()
            if not ca_bundle.is_file():
                raise ValueError(f"DICOMweb peer {name}: CA bundle {ca_bundle} is not a file")
        max_instances = _positive(name, "max_instances", options.get("max_instances", "100"))
        max_mb = _positive(name, "max_mb", options.get("max_mb", "64"))
        return cls(
            name,
            base_url,
            auth,
            username,
            secret,
            secret_file,
            verify,
            ca_bundle,
            max_instances,
            max_mb * 2**20,
        )

    @property
    def plain_http(self) -> bool:
        return self.url.startswith("http://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    def __str__(self) -> str:
        parts = [f"{self.name}={self.url}", f"auth={self.auth}"]
        if self.username is not None:
            parts.append(f"user={self.username}")
        if self.secret is not None:
            kind = "token" if self.auth == "bearer" else "password"
            if self.secret_file is not None:
                parts.append(f"{kind}_file={self.secret_file}")
            else:
                parts.append(f"{kind}=********")
        if not self.verify:
            parts.append("verify=false")
        if self.ca_bundle is not None:
            parts.append(f"ca={self.ca_bundle}")
        parts.append(f"max_instances={self.max_instances}")
        parts.append(f"max_mb={self.max_bytes // 2**20}")
        return ";".join(parts)


def _base_url(name: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"DICOMweb peer {name}: {url!r} is not an http(s):// base URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"DICOMweb peer {name}: put credentials in the user/password options, not the URL"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"DICOMweb peer {name}: a base URL has no query or fragment")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as exc:
        raise ValueError(f"DICOMweb peer {name}: {exc}") from exc
    return url.rstrip("/")


def _credentials(
    name: str, options: Mapping[str, str]
) -> tuple[DicomwebAuth, str | None, SecretStr | None, Path | None]:
    token_given = "token" in options or "token_file" in options
    basic_given = any(key in options for key in ("user", "password", "password_file"))
    implied = "bearer" if token_given else "basic" if basic_given else "none"
    auth = options.get("auth", implied)
    if auth not in ("none", "bearer", "basic"):
        raise ValueError(f"DICOMweb peer {name}: auth {auth!r}: expected none, bearer or basic")
    if auth != implied:
        raise ValueError(
            f"DICOMweb peer {name}: auth={auth} needs "
            + {
                "none": "no credentials",
                "bearer": "token or token_file (and no user/password)",
                "basic": "user and password or password_file (and no token)",
            }[auth]
        )
    if auth == "none":
        return "none", None, None, None
    if auth == "bearer":
        secret, secret_file = _secret(name, options, "token")
        return "bearer", None, secret, secret_file
    username = options.get("user", "")
    if not username or ":" in username:
        raise ValueError(f"DICOMweb peer {name}: basic auth needs a user without ':'")
    secret, secret_file = _secret(name, options, "password")
    return "basic", username, secret, secret_file


def _secret(name: str, options: Mapping[str, str], kind: str) -> tuple[SecretStr, Path | None]:
    inline, file = options.get(kind), options.get(f"{kind}_file")
    if (inline is None) == (file is None):
        raise ValueError(f"DICOMweb peer {name}: give exactly one of {kind} and {kind}_file")
    if file is not None:
        path = Path(file).expanduser().resolve()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"DICOMweb peer {name}: cannot read {kind}_file: {exc}") from exc
        if not value:
            raise ValueError(f"DICOMweb peer {name}: {kind}_file {path} is empty")
        return SecretStr(value), path
    if not inline:
        raise ValueError(f"DICOMweb peer {name}: {kind} is empty")
    return SecretStr(inline), None


def _boolean(name: str, key: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"DICOMweb peer {name}: {key}={value!r}: expected true or false")


def _positive(name: str, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"DICOMweb peer {name}: {key}={value!r}: expected a positive integer")
    return number
