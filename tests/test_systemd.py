"""
The relay under systemd: the unit files in contrib/systemd pass
C{systemd-analyze verify}, and the relay serves TLS on a listening socket it
inherits the way systemd passes one (socket activation: fd 3, C{LISTEN_FDS},
C{LISTEN_PID}, C{LISTEN_FDNAMES}).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP6ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from coder1_wire.tls import client_tls_options

from .loopback import reactor
from .test_cli import Collect

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
SOURCE = FilePath(__file__).parent().parent()
UNITS = SOURCE.descendant(["contrib", "systemd"])
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
#: Sets LISTEN_PID to its own pid, which exec keeps, as systemd sets it for the process it starts.
AS_SYSTEMD_STARTS_IT = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'


class UnitFileTests(TestCase):
    """The unit files as shipped."""

    def test_units_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing to say about the socket and service
        units, once C{ExecStart} names a twistd that exists here (the shipped path,
        /opt/coder1-relay/bin/twistd, is where the README installs it).
        """
        if not os.path.exists(SYSTEMD_ANALYZE):
            raise self.skipTest(f"{SYSTEMD_ANALYZE} is not installed")
        here = FilePath(self.mktemp())
        here.makedirs()
        for unit in ("coder1-relay.socket", "coder1-relay.service"):
            text = UNITS.child(unit).getContent().decode()
            if unit.endswith(".service"):
                self.assertIn("ExecStart=/opt/coder1-relay/bin/twistd ", text)
                text = text.replace("/opt/coder1-relay/bin/twistd", TWISTD)
            here.child(unit).setContent(text.encode())
            here.child(unit).chmod(0o644)  # systemd warns about executable unit files
        checked = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", "--man=no", "coder1-relay.socket", "coder1-relay.service"],
            cwd=here.path,
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual((checked.returncode, checked.stdout + checked.stderr), (0, ""))

    def test_service_is_what_the_readme_says(self) -> None:
        """
        The service runs the relay in the foreground on the socket systemd passes,
        its state in the StateDirectory, as a user of its own, hardened, with the
        open-file limit raised; the socket is port 443.
        """
        service = UNITS.child("coder1-relay.service").getContent().decode()
        for line in (
            "--nodaemon --pidfile= coder1-relay",
            "--listen systemd:domain=INET6:index=0",
            "--state-dir /var/lib/coder1-relay",
            "StateDirectory=coder1-relay",
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "ProtectHome=yes",
            "PrivateTmp=yes",
        ):
            self.assertIn(line, service)
        self.assertRegex(service, r"\nLimitNOFILE=\d+\n")
        socket_unit = UNITS.child("coder1-relay.socket").getContent().decode()
        self.assertIn("\nListenStream=443\n", socket_unit)


class _Fetch(Protocol):
    """Sends one request, keeps the answer until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(self.received)


class SocketActivationTests(TestCase):
    """The real C{twistd coder1-relay} on a socket passed as systemd passes it."""

    timeout = 60

    async def test_relay_serves_an_inherited_socket(self) -> None:
        """
        Given a listening IPv6 socket as fd 3 with LISTEN_FDS=1 and its own pid in
        LISTEN_PID, C{--listen systemd:domain=INET6:index=0} serves the page over
        TLS 1.3 on it (with the certificate it prints), and plain HTTP there is
        redirected.
        """
        inherited = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.addCleanup(inherited.close)
        inherited.bind(("::1", 0))
        inherited.listen(16)
        port = inherited.getsockname()[1]
        state = FilePath(self.mktemp())
        argv = [
            "/bin/sh",
            "-c",
            AS_SYSTEMD_STARTS_IT,
            "sh",
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            "coder1-relay",
            "--listen",
            "systemd:domain=INET6:index=0",
            "--state-dir",
            state.path,
        ]
        env = {
            **os.environ,
            "PYTHONPATH": SOURCE.path,
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "https",
        }
        started = Collect(r"coder1 relay at https://localhost:(\d+) ")
        process = reactor.spawnProcess(
            started,
            argv[0],
            argv,
            env=env,
            path=state.parent().path,
            childFDs={0: "w", 1: "r", 2: "r", 3: inherited.fileno()},
        )
        self.addCleanup(_end, process, started)
        said = await started.matched
        self.assertEqual(int(said.group(1)), port)
        cert = state.child("dev-cert.pem").getContent()
        endpoint = TCP6ClientEndpoint(reactor, "::1", port)
        tls = wrapClientTLS(client_tls_options("localhost", cert), endpoint)
        page = _Fetch(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        await connectProtocol(tls, page)
        answer = await page.closed
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        self.assertRegex(answer, re.compile(rb"<html", re.IGNORECASE))
        plain = _Fetch(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await connectProtocol(endpoint, plain)
        redirect = await plain.closed
        self.assertIn(f"\r\nLocation: https://localhost:{port}/x\r\n".encode(), redirect)


async def _end_coroutine(process: object, collected: Collect) -> None:
    if not collected.ended.called:
        process.signalProcess(signal.SIGTERM)  # type: ignore[attr-defined]
    await collected.ended


def _end(process: object, collected: Collect) -> Deferred[None]:
    return Deferred.fromCoroutine(_end_coroutine(process, collected))
