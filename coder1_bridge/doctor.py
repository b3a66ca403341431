"""
C{coder1-bridge doctor}: checks, in order, what the bridge needs, and prints
one line each: the pairing's files, the relay's name, a TCP connection to
it, its TLS 1.3 certificate, its answer to the token, the clock against the
relay's, the shell, a pseudo-terminal and the proxy settings.  A step that
depends on one that failed is skipped.  The exit status is 0 only if every
check passed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TextIO

import attrs
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from coder1_bridge.config import DEFAULT_RELAY, BridgeConfig, RelayAddress, StalePairingError
from coder1_bridge.output import EXIT_FAILED, EXIT_OK, Problem
from coder1_bridge.proxy import ProxySetting
from coder1_bridge.relay_api import RelayAnswer, RelayAPI
from coder1_bridge.relay_endpoint import relay_endpoint, relay_proxy, relay_tls
from coder1_bridge.relay_errors import Where, describe_time, explain
from coder1_wire.secretfile import InsecureFileError

#: Seconds between this machine's clock and the relay's past which checks fail.
MAX_SKEW = 300.0
#: Seconds a connection step may take.
STEP_TIMEOUT = 15


class Failed(Exception):
    """A check failed; the message says how and what to do."""


class Skipped(Exception):
    """A check cannot be made, an earlier one having failed."""


@attrs.define
class Doctor:
    """The checks, and what earlier ones found for later ones."""

    reactor: Any
    directory: FilePath[str]
    environ: Mapping[str, str]
    out: TextIO
    relay: RelayAddress | None = None
    config: BridgeConfig | None = None
    proxy: ProxySetting | None = None
    proxy_problem: str | None = None
    address: tuple[int, str] | None = None
    connected: bool = False
    reachable: bool = False
    answer: RelayAnswer | None = None
    failures: int = 0

    @property
    def where(self) -> Where:
        assert self.relay is not None
        return Where(self.relay)

    async def run(self) -> int:
        steps: list[tuple[str, Callable[[], Coroutine[Any, Any, str]]]] = [
            ("config", self.check_config),
            ("dns", self.check_dns),
            ("tcp", self.check_tcp),
            ("tls", self.check_tls),
            ("token", self.check_token),
            ("clock", self.check_clock),
            ("shell", self.check_shell),
            ("pty", self.check_pty),
            ("proxy", self.check_proxy),
        ]
        for name, step in steps:
            try:
                mark, said = "ok", await step()
            except Failed as e:
                mark, said = "FAIL", str(e)
                self.failures += 1
            except Skipped as e:
                mark, said = "skip", str(e)
            self.out.write(f"{mark:<5} {name:<6} {said}\n")
            self.out.flush()
        if self.failures:
            self.out.write(f"{self.failures} of {len(steps)} checks failed.\n")
            return EXIT_FAILED
        self.out.write("Every check passed.\n")
        return EXIT_OK

    async def check_config(self) -> str:
        try:
            self.config = BridgeConfig.load(self.directory)
        except (InsecureFileError, StalePairingError) as e:
            raise Failed(str(e)) from None
        except (OSError, ValueError, KeyError) as e:
            raise Failed(f"the pairing in {self.directory.path} cannot be read ({e})") from None
        if self.relay is None:
            self.relay = self.config.relay if self.config else RelayAddress(DEFAULT_RELAY)
        try:
            self.proxy = relay_proxy(self.relay, self.environ)
        except Problem as e:
            self.proxy_problem = str(e)
        if self.config is None:
            raise Failed(
                f"not paired ({self.directory.path} holds no pairing): coder1-bridge pair CODE"
            )
        return (
            f"{self.directory.path}: paired with {self.config.relay.url} as bridge "
            f"#{self.config.peer}; its files are private"
        )

    def _target(self) -> tuple[str, int, str]:
        """What this machine connects to: the relay, or the proxy on the way to it."""
        assert self.relay is not None
        if self.proxy is not None:
            return self.proxy.host, self.proxy.port, "the proxy"
        return self.relay.host, self.relay.port, "the relay"

    async def check_dns(self) -> str:
        if self.proxy_problem:
            raise Skipped("the proxy setting is wrong (see proxy)")
        host, port, what = self._target()
        pool = self.reactor.getThreadPool()
        try:
            found = await deferToThreadPool(
                self.reactor, pool, socket.getaddrinfo, host, port, type=socket.SOCK_STREAM
            )
        except OSError:
            raise Failed(
                f"the name {host} ({what}) cannot be found: check its spelling and this "
                "machine's network"
            ) from None
        family, _, _, _, sockaddr = found[0]
        self.address = (family, str(sockaddr[0]))
        return f"{host} ({what}) is {sockaddr[0]}"

    async def check_tcp(self) -> str:
        if self.address is None:
            raise Skipped("no address to connect to")
        family, address = self.address
        _, port, what = self._target()
        kind = TCP6ClientEndpoint if family == socket.AF_INET6 else TCP4ClientEndpoint
        endpoint = kind(self.reactor, address, port, timeout=STEP_TIMEOUT)
        began = self.reactor.seconds()
        try:
            protocol = await endpoint.connect(Factory.forProtocol(Protocol))
        except Exception as e:
            assert self.relay is not None
            relay = self.relay if self.proxy is None else RelayAddress(self.proxy.url)
            raise Failed(explain(e, Where(relay), self.reactor.seconds())) from None
        took = self.reactor.seconds() - began
        self.connected = True
        protocol.transport.loseConnection()  # type: ignore[union-attr]
        return f"connected to {what} at {address}:{port} in {took * 1000:.0f} ms"

    async def check_tls(self) -> str:
        if not self.connected:
            raise Skipped("no connection to make it on")
        assert self.relay is not None
        tls = relay_tls(self.relay)
        endpoint = relay_endpoint(self.reactor, self.relay, tls, self.environ)
        probe = _Handshake()
        try:
            await endpoint.connect(Factory.forProtocol(lambda: probe))
            version = await probe.done.addTimeout(STEP_TIMEOUT, self.reactor)
        except TimeoutError:
            probe.transport.abortConnection()  # type: ignore[union-attr]
            raise Failed(
                f"the relay did not finish a TLS handshake within {STEP_TIMEOUT} s"
            ) from None
        except Exception as e:
            raise Failed(explain(e, self.where, self.reactor.seconds(), tls.presented())) from None
        self.reachable = True
        certificate = tls.presented()
        until = f", valid until {certificate.not_valid_after_utc:%Y-%m-%d}" if certificate else ""
        via = f" through {self.proxy.url}" if self.proxy else ""
        return f"{version}{via}; the certificate of {self.relay.host} is trusted{until}"

    async def check_token(self) -> str:
        if not self.reachable:
            raise Skipped("the relay cannot be reached")
        token = self.config.token if self.config else None
        try:
            async with RelayAPI(self.reactor, self.where.relay, self.environ) as api:
                self.answer = await api.call(b"GET", "/api/token", token=token)
        except Problem as e:
            raise Failed(str(e)) from None
        if self.config is None:
            raise Skipped("not paired")
        if self.answer.status != 200:
            raise Failed(
                f"the relay refuses it ({self.answer.message}): pair again, coder1-bridge pair CODE"
            )
        expires = describe_time(self.answer.body.get("expires_at"))
        return f"the relay accepts this bridge's token (valid until {expires})"

    async def check_clock(self) -> str:
        theirs = self.answer.date() if self.answer is not None else None
        if theirs is None:
            raise Skipped("no answer of the relay's to read its clock from")
        skew = self.reactor.seconds() - theirs
        ahead = "ahead of" if skew > 0 else "behind"
        if abs(skew) > MAX_SKEW:
            raise Failed(
                f"this machine's clock is {abs(skew):.0f} s {ahead} the relay's: set it right "
                "(certificates and tokens are checked against it), e.g. turn on NTP"
            )
        if abs(skew) < 2:
            return "within 2 s of the relay's"
        return f"{abs(skew):.0f} s {ahead} the relay's"

    async def check_shell(self) -> str:
        shell = self.environ.get("SHELL") or "/bin/sh"
        if not (os.path.isabs(shell) and os.access(shell, os.X_OK)):
            raise Failed(
                f"the shell {shell} (SHELL) cannot be run: terminals would not open; set SHELL "
                "to your login shell"
            )
        return f"terminals run {shell}"

    async def check_pty(self) -> str:
        try:
            controller, terminal = os.openpty()
        except OSError as e:
            raise Failed(
                f"no pseudo-terminal can be opened ({e.strerror}): terminals would not open"
            ) from None
        name = os.ttyname(terminal)
        os.close(controller)
        os.close(terminal)
        return f"pseudo-terminals can be opened ({name})"

    async def check_proxy(self) -> str:
        if self.proxy_problem:
            raise Failed(self.proxy_problem)
        if self.proxy is not None:
            return f"{self.proxy.url} (from {self.proxy.source}), tunnelling with CONNECT"
        named = [
            n for n in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if n in self.environ
        ]
        if named:
            return f"none: NO_PROXY names {self.where.relay.host}, so it is reached directly"
        return "none (HTTPS_PROXY is not set): the relay is reached directly"


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    """Waits for the TLS handshake, says its version, and hangs up."""

    def __init__(self) -> None:
        self.done: Deferred[str] = Deferred()

    def handshakeCompleted(self) -> None:
        handle: Any = self.transport.getHandle()  # type: ignore[union-attr]
        self.done.callback(handle.get_protocol_version_name().replace("TLSv", "TLS "))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)
