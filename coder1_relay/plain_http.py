"""
Plain HTTP on the relay's TLS port (C{http://relay:8443/}): a redirect to the
https URL instead of a connection closed without a word.

The first byte a client sends tells which it speaks: a TLS record starts with
0x16 (a handshake), an HTTP request with a method's capital letter.
L{PlainHTTPAnsweringTLS} looks at that byte once, then gets out of the way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from coder1_relay.tls_server import TLSServerProtocol

#: The first byte of a TLS handshake record (ClientHello).
TLS_HANDSHAKE = 0x16
#: The most of a plain request's head kept before answering anyway.
MAX_HEAD = 8192
#: The longest path carried over to the https URL (else: the root).
MAX_PATH = 2048


def looks_like_http(first: int) -> bool:
    """Whether a connection whose first byte is C{first} starts an HTTP request (GET, POST, …)."""
    return 0x41 <= first <= 0x5A


def answer(head: bytes, https_url: str) -> bytes:
    """
    The whole answer to the plain HTTP request whose head (so far) is
    C{head}: GET and HEAD are sent to the same path at C{https_url} (301),
    anything else is told in one line to use it (400).  A path with anything
    but visible ASCII, or too long, becomes the root.
    """
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    method, _, rest = line.partition(b" ")
    target = rest.partition(b" ")[0]
    usable = (
        target.startswith(b"/")
        and len(target) <= MAX_PATH
        and all(0x21 <= byte <= 0x7E for byte in target)
    )
    path = target.decode("ascii") if usable else "/"
    url = https_url.rstrip("/") + path
    if method in (b"GET", b"HEAD"):
        status = "301 Moved Permanently"
        body = f"This port speaks HTTPS only: {url}\n"
        location = f"Location: {url}\r\n"
    else:
        status = "400 Bad Request"
        body = f"This port speaks HTTPS only: use {https_url.rstrip('/')}/\n"
        location = ""
    encoded = body.encode()
    headers = (
        f"HTTP/1.1 {status}\r\n{location}"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(encoded)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return headers if method == b"HEAD" else headers + encoded


class PlainHTTPAnsweringTLS(TLSServerProtocol):
    """
    TLS, unless the client opens with plain HTTP: then, once the request's
    head is in (or L{MAX_HEAD} of it), the answer of L{answer} and the
    connection closed.  The wrapped protocol's timeouts (the TLS handshake
    timeout, from the connection) bound a client that sends half a request.
    Its factory has C{https_url()}: where to send plain requests.
    """

    factory: Any
    #: The plain request's head so far; None until the first byte said HTTP.
    _head: bytearray | None = None
    _answered = False

    def dataReceived(self, data: bytes) -> None:
        if self._head is None:
            if not looks_like_http(data[0]):
                # TLS (or garbage, which TLS refuses): from now on the transport
                # calls TLS directly, so later reads cost nothing more than before.
                tls = super().dataReceived
                vars(self)["dataReceived"] = tls
                tls(data)
                return
            self._head = bytearray()
        if self._answered:
            return
        self._head += data
        if b"\r\n\r\n" in self._head or b"\n\n" in self._head or len(self._head) >= MAX_HEAD:
            self._answered = True
            transport: Any = self.transport
            transport.write(answer(bytes(self._head[:MAX_HEAD]), self.factory.https_url()))
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The shortcut is a bound method of this instance: a reference cycle that
        # only the garbage collector would free.
        vars(self).pop("dataReceived", None)
        super().connectionLost(reason)
