"""X-Forwarded-* headers, honoured only from the reverse proxies the settings name.

werkzeug's ``ProxyFix`` trusts a fixed number of hops from whoever connects:
behind it, any client that reaches the server directly could pick its own
address (and so its own rate-limit key) with one header. Here ``ProxyFix``
applies only when the connecting address is a trusted proxy, and counts as
hops that proxy plus the trusted proxies in front of it at the right end of
``X-Forwarded-For`` (as nginx's ``real_ip_recursive``): the client is the
nearest address that is not one of ours. Other requests keep the connecting
address, whatever headers they carry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from werkzeug.middleware.proxy_fix import ProxyFix

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """WSGI middleware: ``ProxyFix`` for requests that come through a trusted proxy."""

    def __init__(self, app: WSGIApplication, proxies: Iterable[str]) -> None:
        self.app = app
        self.networks: list[_Network] = [ipaddress.ip_network(p, strict=False) for p in proxies]

    def trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def hops(self, environ: WSGIEnvironment) -> int:
        """How many X-Forwarded-For entries to believe: 0 when the peer is not trusted."""
        if not self.trusted(environ.get("REMOTE_ADDR", "")):
            return 0
        forwarded = [
            part.strip()
            for part in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")
            if part.strip()
        ]
        hops = 1
        # Each trusted proxy in the chain vouches for the entry to its left.
        while hops < len(forwarded) and self.trusted(forwarded[-hops]):
            hops += 1
        return hops

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        hops = self.hops(environ)
        if hops == 0:
            return self.app(environ, start_response)
        fixed = ProxyFix(self.app, x_for=hops, x_proto=1, x_host=1, x_port=1, x_prefix=1)
        return fixed(environ, start_response)
