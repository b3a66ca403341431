"""
Renewing the relay's certificate while it runs (C{coder1_relay.reload}): a
new pair is served to new connections, open ones never notice, a bad pair is
refused in one line.
"""

from __future__ import annotations

import datetime
import io
import os
import signal
import ssl
from typing import Any, cast

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from coder1_bridge.config import RelayAddress
from coder1_bridge.pairing import pair
from coder1_relay import certs
from coder1_relay.reload import CertificateReloader, PairFiles, RefusedPair, read_pair
from coder1_relay.service import RelayService
from coder1_wire.envelope import Envelope, Kind, control
from coder1_wire.secretfile import write_secret

from .loopback import (
    RELAY_MAIN,
    Browser,
    ChildRelay,
    IDEConnection,
    _Context,
    _Keys,
    _Port,
    settle,
    spawn_python,
    start_bridge,
    start_relay,
    stop_all,
)
from .test_mesh import MeshTestCase

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@attrs.frozen
class CA:
    """A certificate authority for the tests, as a public CA would be for a real relay."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coder1 test CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        not_before: datetime.datetime = NOW - DAY,
        not_after: datetime.datetime = NOW + 9 * DAY,
    ) -> tuple[bytes, bytes]:
        """A leaf for localhost and its key, as PEM: what a renewal writes."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(_loopback())]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM) + self.pem, key_pem


def _loopback() -> Any:
    import ipaddress

    return ipaddress.ip_address("127.0.0.1")


def install(folder: FilePath[str], pair: tuple[bytes, bytes]) -> PairFiles:
    """Write C{pair} over the files in C{folder}, as a renewal does (a new file, renamed)."""
    folder.makedirs(ignoreExistingDirectory=True)
    files = PairFiles(folder.child("fullchain.pem"), folder.child("privkey.pem"))
    for path, data in ((files.cert, pair[0]), (files.key, pair[1])):
        temporary = path.siblingExtension(".new")
        temporary.setContent(data)
        temporary.chmod(0o600)
        os.replace(temporary.path, path.path)
    return files


def fingerprint(pem: bytes) -> str:
    return certs.fingerprint(pem)


def served(port: int) -> Deferred[str]:
    """The fingerprint of the leaf certificate a new TLS 1.3 connection to C{port} is shown."""
    d: Deferred[str] = deferToThread(ssl.get_server_certificate, ("127.0.0.1", port))
    return d.addCallback(lambda pem: fingerprint(pem.encode()))


def capture_errors(test: Any) -> list[str]:
    """The text of every error-level log event from now to the end of C{test}."""
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observer(event: LogEvent) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.error:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


class ReadPairTests(SynchronousTestCase):
    """A new pair is checked before it is served; what is wrong is said without a path."""

    def setUp(self) -> None:
        self.ca = CA.make()
        self.folder = FilePath(self.mktemp())
        self.files = install(self.folder, self.ca.issue())

    def refused(self, now: float | None = None) -> str:
        stamp = NOW.timestamp() if now is None else now
        error = self.assertRaises(RefusedPair, read_pair, self.files, stamp)
        self.assertNotIn(self.folder.path, str(error))
        return str(error)

    def test_good_pair(self) -> None:
        """A chain and its key are read back, leaf first, with the CA after it."""
        chain, key = read_pair(self.files, NOW.timestamp())
        self.assertEqual(len(x509.load_pem_x509_certificates(chain)), 2)
        self.assertIn(b"PRIVATE KEY", key)

    def test_unreadable(self) -> None:
        """A missing file is refused by its option's name."""
        self.files.key.remove()
        self.assertEqual(self.refused(), "--tls-key cannot be read")

    def test_not_pem(self) -> None:
        """A certificate file that is not PEM (here the passwd format) is refused."""
        self.files.cert.setContent(b"root:x:0:0:root:/root:/bin/bash\n")
        self.assertEqual(self.refused(), "--tls-cert holds no PEM certificate")

    def test_key_not_pem(self) -> None:
        """A key file that holds no key is refused."""
        self.files.key.setContent(b"not a key\n")
        self.assertEqual(self.refused(), "--tls-key is not an unencrypted PEM private key")

    def test_mismatch(self) -> None:
        """A key of another certificate (a renewal half written) is refused."""
        other = self.ca.issue()
        self.files.key.setContent(other[1])
        self.assertIn("does not match", self.refused())

    def test_expired(self) -> None:
        """A certificate past its end is refused, with the day it ended."""
        install(self.folder, self.ca.issue(NOW - 9 * DAY, NOW - DAY))
        self.assertEqual(
            self.refused(),
            f"the certificate in --tls-cert expired on {NOW - DAY:%Y-%m-%d}",
        )

    def test_not_yet_valid(self) -> None:
        """A certificate whose validity starts later is refused too."""
        install(self.folder, self.ca.issue(NOW + DAY, NOW + 9 * DAY))
        self.assertIn("is not valid before", self.refused())


class PollTests(SynchronousTestCase):
    """The files' modification times are checked every C{interval} seconds, on the clock."""

    def setUp(self) -> None:
        self.ca = CA.make()
        self.folder = FilePath(self.mktemp())
        first = self.ca.issue()
        self.files = install(self.folder, first)
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        keys = certs.RelayKeys(first[0], first[1], signing_key=_ed25519(), accepted=())
        self.reloaded: list[certs.RelayKeys] = []
        self.reloader = CertificateReloader(
            self.clock, self.files, keys, self.reloaded.append, interval=300
        )
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.errors = capture_errors(self)

    def test_changed_files_are_read_at_the_next_check(self) -> None:
        """A renewal is served at the first check after it, not before."""
        second = self.ca.issue()
        install(self.folder, second)
        self.clock.advance(299)
        self.assertEqual(self.reloaded, [])
        self.clock.advance(1)
        self.assertEqual([k.tls_cert_pem for k in self.reloaded], [second[0]])
        self.assertEqual(self.reloader.keys.tls_cert_pem, second[0])

    def test_unchanged_files_are_not_read(self) -> None:
        """
        Files whose modification time, inode and size did not change are not
        read: here the certificate is overwritten in place with as many bytes
        of junk, and its time set back, so reading it would log a refusal.
        """
        before = os.stat(self.files.cert.path)
        with open(self.files.cert.path, "r+b") as f:
            f.write(b"x" * before.st_size)
        os.utime(self.files.cert.path, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.clock.advance(3000)
        self.assertEqual((self.reloaded, self.errors), ([], []))

    def test_bad_pair_refused_once(self) -> None:
        """
        A half-written renewal (new certificate, old key) is refused in one log
        line and not read again until a file changes; the rest of the renewal
        is then served.
        """
        second = self.ca.issue()
        self.files.cert.setContent(second[0])
        self.clock.advance(300 * 5)
        self.assertEqual(len(self.errors), 1)
        self.assertIn(
            "TLS certificate not reloaded: the key in --tls-key does not match", self.errors[0]
        )
        self.assertNotIn("\n", self.errors[0])
        self.assertEqual(self.reloaded, [])
        install(self.folder, second)
        self.clock.advance(300)
        self.assertEqual([k.tls_cert_pem for k in self.reloaded], [second[0]])

    def test_reload_on_demand(self) -> None:
        """L{CertificateReloader.reload} (what SIGHUP calls) reads at once, changed or not."""
        self.assertTrue(self.reloader.reload())
        self.assertEqual(self.reloaded, [])  # the same pair: nothing to swap
        install(self.folder, self.ca.issue(NOW - 9 * DAY, NOW - DAY))
        self.assertFalse(self.reloader.reload())
        self.assertEqual(len(self.errors), 1)


def _ed25519() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


class _Terminal(IDEConnection):
    """An IDE connection that keeps what a terminal prints."""

    printed: bytes = b""

    def received(self, envelope: Envelope) -> None:
        if envelope.kind == Kind.PTY_OUTPUT:
            self.printed += envelope.payload
        super().received(envelope)


@attrs.frozen
class _TrustingCA:
    """What L{Browser} reads of a relay, with the CA as the certificate it trusts."""

    relay: RelayService
    ca: bytes

    @property
    def context(self) -> Any:
        return self.relay.context

    @property
    def keys(self) -> _Keys:
        return _Keys(self.ca)

    @property
    def port(self) -> Any:
        return self.relay.port


class LiveReloadTests(TestCase):
    """A real relay, bridge and IDE client over TLS 1.3, and a certificate renewed under them."""

    timeout = 60

    async def test_renewal_while_a_terminal_is_open(self) -> None:
        """
        The certificate files are replaced while a terminal is open and the
        reload entry point is called: a new TLS connection is shown the new
        certificate; the terminal echoes input typed after the reload over
        the same connections, the bridge's and the IDE's, which never closed.
        A bad pair after that is refused in one line; the new certificate
        stays.
        """
        self.addCleanup(lambda: Deferred.fromCoroutine(settle()))
        ca = CA.make()
        folder = FilePath(self.mktemp())
        first = ca.issue()
        files = install(folder, first)
        relay = await start_relay(FilePath(self.mktemp()), tls_cert=files.cert, tls_key=files.key)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(relay)))
        port = relay.port.getHost().port  # type: ignore[union-attr]
        browser = Browser(_TrustingCA(relay, ca.pem))  # type: ignore[arg-type]
        await browser.open_page()
        code = await browser.new_code()
        address = RelayAddress(relay.context.public_url, ca.pem.decode())
        config = await pair(
            reactor, FilePath(self.mktemp()), address, code, "renewal", io.StringIO(), {}
        )
        bridge = await start_bridge(config)
        self.addCleanup(lambda: Deferred.fromCoroutine(stop_all(bridge)))
        ide = await browser.connect_ide(connection=_Terminal(browser.identity))
        self.addCleanup(ide.close)
        if not ide.channels:
            await ide.wait_for(lambda e: e.kind == Kind.PRESENCE and bool(e.json()["bridges"]))
            await ide.handshake(1)
        ide.send(control(Kind.RESUME, {"client": "renewal", "streams": []}, peer=1))
        body = {"cols": 80, "rows": 24, "argv": ["sh", "-c", "stty raw -echo; exec cat"]}
        ide.send(control(Kind.PTY_OPEN, body, stream=1, peer=1))
        await ide.wait_for(lambda e: e.kind == Kind.PTY_OPENED)
        await self.typed(ide, 1, b"before")
        bridge_link, ide_link = bridge.protocol, ide.protocol
        self.assertEqual(await served(port), fingerprint(first[0]))

        errors = capture_errors(self)
        second = ca.issue()
        install(folder, second)
        self.assertTrue(relay.reload_certificate())
        self.assertEqual(await served(port), fingerprint(second[0]))
        await self.typed(ide, 2, b"after")
        self.assertIs(bridge.protocol, bridge_link)
        self.assertIs(ide.protocol, ide_link)
        self.assertIsNone(ide.close_code)

        install(folder, (second[0], ca.issue()[1]))
        self.assertFalse(relay.reload_certificate())
        self.assertEqual(await served(port), fingerprint(second[0]))
        self.assertEqual(len(errors), 1, errors)
        await self.typed(ide, 3, b"still")
        self.assertIs(bridge.protocol, bridge_link)

    async def typed(self, ide: IDEConnection, seq: int, text: bytes) -> None:
        """Type C{text} into the terminal and wait for it to come back."""
        assert isinstance(ide, _Terminal)
        ide.send(Envelope(Kind.PTY_INPUT, 1, seq, 1, text))
        for _ in range(200):
            if ide.printed.endswith(text):
                return
            await deferLater(reactor, 0.05)
        self.fail(f"the terminal did not echo {text!r}: {ide.printed!r}")


class HangupTests(TestCase):
    """C{twistd coder1-relay}'s service, in a process of its own, reloads on a real SIGHUP."""

    timeout = 60

    async def test_sighup(self) -> None:
        """
        SIGHUP makes the relay process serve the renewed pair to new
        connections; a bad pair after it (not PEM) is refused with one line,
        no traceback, and the process keeps serving the renewed one.
        """
        ca = CA.make()
        folder = FilePath(self.mktemp())
        first = ca.issue()
        files = install(folder, first)
        child = spawn_python(
            RELAY_MAIN,
            "--listen=tcp:0:interface=127.0.0.1",
            f"--state-dir={self.mktemp()}",
            f"--tls-cert={files.cert.path}",
            f"--tls-key={files.key.path}",
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(child.stop()))
        found = await child.wait_for(rb"coder1 relay at https://localhost:(\d+)")
        port = int(found.group(1))
        self.assertEqual(await served(port), fingerprint(first[0]))

        second = ca.issue()
        install(folder, second)
        os.kill(child.pid, signal.SIGHUP)
        await child.wait_for(rb"TLS certificate reloaded")
        self.assertEqual(await served(port), fingerprint(second[0]))

        files.cert.setContent(b"root:x:0:0:root:/root:/bin/bash\n")
        os.kill(child.pid, signal.SIGHUP)
        await child.wait_for(rb"TLS certificate not reloaded[^\n]*\n")
        self.assertEqual(await served(port), fingerprint(second[0]))
        text = child.output.decode()
        self.assertEqual(text.count("not reloaded"), 1)
        self.assertIn(
            "TLS certificate not reloaded: --tls-cert holds no PEM certificate; "
            f"still serving SHA-256 {fingerprint(second[0])}",
            text,
        )
        self.assertNotIn("Traceback", text)
        self.assertNotIn(folder.path, text)


def dev_pair() -> tuple[bytes, bytes]:
    """A new self-signed pair for localhost, as a shared development certificate is."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs._self_signed(key, {"localhost", _loopback()})
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class MeshReloadTests(MeshTestCase):
    """Relay nodes that share a self-signed certificate renew it one after the other."""

    async def test_node_links_across_a_rolling_renewal(self) -> None:
        """
        Two nodes share a self-signed certificate, which their node links
        trust.  Node A (where the tab is) reloads a new one first: its link to
        node B (which holds the session and still presents the old one) works;
        then B reloads too, and a tab on A still reaches the bridge on B.
        """
        a, b = await self.start_nodes()
        browser = Browser(self.deployment)
        await browser.open_page()
        await self.pair_bridge(browser, code_on=0, redeem_on=1)
        new = dev_pair()
        browser.relay = ChildRelay(
            None,  # type: ignore[arg-type]  # no process: only what clients read
            _Context(self.deployment.context.public_url),
            _Keys(new[0]),
            _Port(self.deployment.port.getHost().port),  # type: ignore[union-attr]
        ).as_service()
        for step, node in enumerate((a, b)):
            state = node.settings.state_dir
            install_dev(state, new)
            self.assertTrue(node.reload_certificate())
            ide = await self.connect(browser, a)
            result = await ide.run(1, {"shell": f"echo step-{step}"})
            self.assertEqual(result.stdout, f"step-{step}\n".encode())
            await ide.close()


def install_dev(state: FilePath[str], pair: tuple[bytes, bytes]) -> None:
    """Write C{pair} as the development certificate in the state directory C{state}."""
    for name, data in ((certs.DEV_CERT_NAME, pair[0]), (certs.DEV_KEY_NAME, pair[1])):
        write_secret(state.child(name), data)
