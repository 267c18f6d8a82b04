"""Who may drive ``fewshot-seg serve``: the checks every request passes before the page's server works.

A page the user has open in another tab can send requests to ``http://127.0.0.1:7860`` too: a cross-site
``fetch(..., {mode: "no-cors"})`` or ``<form>`` post arrives without a CORS preflight as long as its
``Content-Type`` is ``text/plain`` (or a form type), and a DNS-rebinding page reaches the server under its
own host name (``Host: evil.example``) and may read the answers. So (docs/inference.md, "Security"):

* **Host**: only the names the server was started for (the loopback names ``127.0.0.1``, ``localhost``,
  ``[::1]``, or the ``--host`` given) with its port; a wildcard ``--host`` (``0.0.0.0``, ``::``) cannot
  know its names and relies on the token.
* **Origin**: a request that carries one (browsers send it on every POST) must come from such a host.
* **Content-Type**: the API takes ``application/json`` only, which a browser never sends cross-site
  without a preflight that this server does not answer.
* **Token**: on a non-loopback ``--host`` every request must carry the token printed with the URL
  (``?token=...`` or the ``X-Fewshot-Token`` header), as Jupyter does.
* **Content-Length**: required, a non-negative integer (a missing one: 411; a malformed one: 400).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
TOKEN_HEADER = "X-Fewshot-Token"


class Refused(Exception):
    """A request the server does not serve: an HTTP status and a message for the JSON answer."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Guard:
    """The request policy of one server.

    Attributes:
        hosts: the accepted ``Host`` values (``name:port``); empty = any (a wildcard ``--host``).
        token: the token every request must carry; None on a loopback ``--host``.
    """

    hosts: frozenset[str]
    token: str | None

    @classmethod
    def for_address(cls, host: str, port: int) -> Guard:
        """The policy for a server listening on ``host:port`` (the port actually bound)."""
        if is_loopback(host):
            names = {*LOOPBACK_NAMES, host if ":" not in host else f"[{host.strip('[]')}]"}
            return cls(frozenset(_with_port(n, port) for n in names), None)
        if host in WILDCARD_HOSTS:
            return cls(frozenset(), secrets.token_hex(24))
        name = f"[{host.strip('[]')}]" if ":" in host else host
        return cls(frozenset({_with_port(name, port)}), secrets.token_hex(24))

    def check(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        """Raise :class:`Refused` unless the request may be served (before its body is read)."""
        host = (headers.get("Host") or "").lower()
        if self.hosts and host not in self.hosts:
            raise Refused(
                HTTPStatus.FORBIDDEN,
                f"Host {host or '(none)'!r} refused: open the page at one of {sorted(self.hosts)}",
            )
        origin = headers.get("Origin")
        if origin is not None and not self._same_site(origin, host):
            raise Refused(HTTPStatus.FORBIDDEN, f"cross-site request from Origin {origin!r} refused")
        if self.token is not None:
            given = headers.get(TOKEN_HEADER) or parse_qs(urlsplit(path).query).get("token", [""])[0]
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                raise Refused(
                    HTTPStatus.FORBIDDEN,
                    "missing or wrong token: open the address with ?token=... that the server printed",
                )
        if method == "POST":
            kind = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                raise Refused(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    f"Content-Type {kind or '(none)'!r} refused: the API takes application/json only",
                )

    def _same_site(self, origin: str, host: str) -> bool:
        parts = urlsplit(origin)
        return parts.scheme == "http" and parts.netloc.lower() == host and bool(host)

    def url(self, host: str, port: int) -> str:
        """The address to print: the token appended where one is required."""
        name = "127.0.0.1" if host in WILDCARD_HOSTS else (f"[{host}]" if ":" in host else host)
        return f"http://{name}:{port}/" + (f"?token={self.token}" if self.token else "")


def _with_port(name: str, port: int) -> str:
    return f"{name}:{port}".lower()


def content_length(headers: Mapping[str, str]) -> int:
    """The body size a request announces.

    Raises:
        Refused: 411 without ``Content-Length`` (the body's end is unknown: HTTP/1.0 has no chunking
            here), 400 for a value that is not a non-negative integer.
    """
    raw = headers.get("Content-Length")
    if raw is None:
        raise Refused(HTTPStatus.LENGTH_REQUIRED, "a request body needs a Content-Length header")
    if not raw.strip().isdigit():
        raise Refused(HTTPStatus.BAD_REQUEST, f"Content-Length {raw!r} is not a non-negative integer")
    return int(raw)


__all__ = ["LOOPBACK_NAMES", "TOKEN_HEADER", "Guard", "Refused", "content_length", "is_loopback"]
