"""
Tests for L{coder1_relay.certs} and L{coder1_wire.secretfile}, including real
TLS handshakes on the loopback interface.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import stat
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from coder1_relay.certs import (
    ACCEPTED_KEYS_DIR,
    DEV_CERT_NAME,
    DEV_KEY_NAME,
    SIGNING_KEY_NAME,
    RelayKeys,
    default_state_dir,
    fingerprint,
    load_or_create,
    server_ssl_context,
)
from coder1_relay.tls_server import TLSServerFactory, TLSServerProtocol
from coder1_wire.secretfile import (
    InsecureFileError,
    append_secret,
    check_private,
    read_secret,
    write_secret,
)
from coder1_wire.tls import client_tls_options

DEFAULT_HOSTNAMES = ["localhost", "127.0.0.1", "::1"]
ONE_DAY = datetime.timedelta(days=1)


def _mode(path: FilePath[str]) -> int:
    return stat.S_IMODE(os.stat(path.path).st_mode)


def _leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(each.public_bytes(serialization.Encoding.PEM) for each in certs)


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    hostnames: Sequence[str] = (),
    lifetime: datetime.timedelta = 30 * ONE_DAY,
) -> x509.Certificate:
    """
    A certificate for C{key}, signed by C{issuer} (self-signed without one).
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hostnames:
        sans: list[x509.GeneralName] = []
        for each in hostnames:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(each)))
            except ValueError:
                sans.append(x509.DNSName(each))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _same_key(cert_pem: bytes, key_pem: bytes) -> bool:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    key = serialization.load_pem_private_key(key_pem, password=None)
    return _leaf(cert_pem).public_key().public_bytes(der, spki) == key.public_key().public_bytes(
        der, spki
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class SecretFileTests(TestCase):
    """
    L{write_secret}, L{append_secret}, L{read_secret} and L{check_private}.
    """

    def setUp(self) -> None:
        self.root = FilePath(self.mktemp())

    def test_writeCreatesPrivateFileAndDirectories(self) -> None:
        """
        Missing parent directories are created 0700 (every level, not only the
        last) and the file 0600, holding exactly the data.
        """
        target = self.root.child("a").child("b").child("secret")
        write_secret(target, b"s3cret")
        self.assertEqual(target.getContent(), b"s3cret")
        self.assertEqual(_mode(target), 0o600)
        for directory in (self.root, self.root.child("a"), target.parent()):
            self.assertEqual(_mode(directory), 0o700, directory.path)

    def test_modeDoesNotDependOnUmask(self) -> None:
        """
        Even with an empty umask the file is 0600: the mode is set when the
        file is created, not loosened by the process's umask.
        """
        self.addCleanup(os.umask, os.umask(0))
        target = self.root.child("secret")
        write_secret(target.path, b"x")
        self.assertEqual(_mode(target), 0o600)
        self.assertEqual(_mode(self.root), 0o700)

    def test_overwriteReplacesAtomically(self) -> None:
        """
        Writing over an existing (even world-readable) file replaces it with a
        new 0600 file and leaves no temporary file behind.
        """
        self.root.makedirs()
        target = self.root.child("secret")
        target.setContent(b"old")
        target.chmod(0o644)
        write_secret(target, b"new")
        self.assertEqual(read_secret(target), b"new")
        self.assertEqual(_mode(target), 0o600)
        self.assertEqual(self.root.listdir(), ["secret"])

    def test_failedWriteLeavesNoTemporaryFile(self) -> None:
        """
        If the final rename fails, the old file is untouched and the
        temporary file is removed.
        """
        self.root.makedirs()
        target = self.root.child("secret")
        target.makedirs()  # a directory cannot be replaced by a file
        self.assertRaises(OSError, write_secret, target, b"x")
        self.assertEqual(self.root.listdir(), ["secret"])
        self.assertTrue(target.isdir())

    def test_append_keeps_the_file(self) -> None:
        """
        L{append_secret} adds to the end of a secret file, which keeps its
        mode; a missing file is an error, never created (with another mode).
        """
        target = self.root.child("journal")
        write_secret(target, b"one\n")
        append_secret(target, b"two\n")
        append_secret(target.path, b"three\n")
        self.assertEqual(read_secret(target), b"one\ntwo\nthree\n")
        self.assertEqual(_mode(target), 0o600)
        self.assertRaises(FileNotFoundError, append_secret, self.root.child("none"), b"x")
        self.assertFalse(self.root.child("none").exists())

    def test_append_refuses_a_symlink(self) -> None:
        """A link planted at the file's name is not followed."""
        self.root.makedirs()
        elsewhere = self.root.child("elsewhere")
        elsewhere.setContent(b"")
        elsewhere.linkTo(self.root.child("journal"))
        self.assertRaises(OSError, append_secret, self.root.child("journal"), b"x")
        self.assertEqual(elsewhere.getContent(), b"")

    def test_checkPrivate(self) -> None:
        """
        L{check_private} accepts an owner-only file and rejects one that group
        or others can read, naming the file and its mode.
        """
        target = self.root.child("secret")
        write_secret(target, b"x")
        check_private(target)
        target.chmod(0o640)
        error = self.assertRaises(InsecureFileError, check_private, target.path)
        self.assertEqual(error.path, target.path)
        self.assertEqual(error.mode, 0o640)
        self.assertIn(target.path, str(error))
        self.assertIn("0640", str(error))


class LoadOrCreateTests(TestCase):
    """
    L{load_or_create} and its files on disk.
    """

    def setUp(self) -> None:
        # A missing parent too: creating it is part of the job.
        self.state = FilePath(self.mktemp()).child("coder1-relay")

    def _load(self, hostnames: Sequence[str] = DEFAULT_HOSTNAMES) -> tuple[RelayKeys, bool]:
        return load_or_create(self.state, tls_cert=None, tls_key=None, hostnames=hostnames)

    def test_filesArePrivate(self) -> None:
        """
        The state directory is 0700 and every file in it is 0600.
        """
        self._load()
        self.assertEqual(_mode(self.state), 0o700)
        self.assertEqual(
            sorted(self.state.listdir()),
            sorted([DEV_CERT_NAME, DEV_KEY_NAME, SIGNING_KEY_NAME]),
        )
        for child in self.state.children():
            self.assertEqual(_mode(child), 0o600, child.path)

    def test_devCertificate(self) -> None:
        """
        The dev certificate is a self-signed, non-CA, one-year P-256
        certificate whose SANs hold every requested DNS name and IP address,
        and it is returned with its key.
        """
        keys, created = self._load()
        self.assertTrue(created)
        cert = _leaf(keys.tls_cert_pem)
        self.assertEqual(cert.issuer, cert.subject)
        cert.verify_directly_issued_by(cert)
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        self.assertIsInstance(public_key.curve, ec.SECP256R1)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertFalse(constraints.value.ca)
        self.assertEqual(_sans(cert).get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            set(_sans(cert).get_values_for_type(x509.IPAddress)),
            {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")},
        )
        lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        self.assertTrue(364 * ONE_DAY < lifetime <= 365 * ONE_DAY, lifetime)
        self.assertTrue(_same_key(keys.tls_cert_pem, keys.tls_key_pem))

    def test_secondCallReusesEverything(self) -> None:
        """
        A second start loads the same certificate and signing key
        rather than making new ones, and reports no new dev certificate.
        """
        first, _ = self._load()
        second, created = self._load()
        self.assertFalse(created)
        self.assertEqual(fingerprint(second.tls_cert_pem), fingerprint(first.tls_cert_pem))
        self.assertEqual(second.tls_key_pem, first.tls_key_pem)
        self.assertEqual(
            second.signing_key.public_key().public_bytes_raw(),
            first.signing_key.public_key().public_bytes_raw(),
        )

    def _write_dev_pair(self, lifetime: datetime.timedelta) -> bytes:
        key = _new_key()
        cert_pem = _cert_pem(_issue("old", key, hostnames=DEFAULT_HOSTNAMES, lifetime=lifetime))
        write_secret(self.state.child(DEV_KEY_NAME), _key_pem(key))
        write_secret(self.state.child(DEV_CERT_NAME), cert_pem)
        return cert_pem

    def test_expiringDevCertificateIsReplaced(self) -> None:
        """
        A dev certificate that expires within 7 days is replaced by a fresh
        one-year certificate, and the new one is written to disk.
        """
        old = self._write_dev_pair(lifetime=6 * ONE_DAY)
        keys, created = self._load()
        self.assertTrue(created)
        self.assertNotEqual(fingerprint(keys.tls_cert_pem), fingerprint(old))
        self.assertGreater(
            _leaf(keys.tls_cert_pem).not_valid_after_utc,
            datetime.datetime.now(datetime.UTC) + 300 * ONE_DAY,
        )
        self.assertEqual(self.state.child(DEV_CERT_NAME).getContent(), keys.tls_cert_pem)

    def test_devCertificateWithTimeLeftIsKept(self) -> None:
        """
        A dev certificate with more than 7 days left is used as it is.
        """
        old = self._write_dev_pair(lifetime=8 * ONE_DAY)
        keys, created = self._load()
        self.assertFalse(created)
        self.assertEqual(fingerprint(keys.tls_cert_pem), fingerprint(old))

    def test_missingHostnameReplacesDevCertificate(self) -> None:
        """
        When the requested hostnames are not all in the dev certificate's
        SANs, a new certificate covering all of them is made.
        """
        first, _ = self._load(["localhost"])
        second, created = self._load(["localhost", "relay.test", "10.1.2.3"])
        self.assertTrue(created)
        self.assertNotEqual(fingerprint(second.tls_cert_pem), fingerprint(first.tls_cert_pem))
        sans = _sans(_leaf(second.tls_cert_pem))
        self.assertEqual(
            sorted(sans.get_values_for_type(x509.DNSName)), ["localhost", "relay.test"]
        )
        self.assertEqual(
            sans.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("10.1.2.3")]
        )

    def test_coveredHostnamesKeepDevCertificate(self) -> None:
        """
        Asking for a subset of the certificate's names, in another case,
        keeps the certificate: only missing names force a new one.
        """
        first, _ = self._load()
        second, created = self._load(["LocalHost", "::1"])
        self.assertFalse(created)
        self.assertEqual(fingerprint(second.tls_cert_pem), fingerprint(first.tls_cert_pem))

    def test_mismatchedDevPairIsReplaced(self) -> None:
        """
        A dev key that does not belong to the dev certificate (say, a crash
        between writing the two) makes a new pair rather than a broken server.
        """
        self._load()
        write_secret(self.state.child(DEV_KEY_NAME), _key_pem(_new_key()))
        keys, created = self._load()
        self.assertTrue(created)
        self.assertTrue(_same_key(keys.tls_cert_pem, keys.tls_key_pem))

    def test_noHostnames(self) -> None:
        """
        A dev certificate cannot be made for no hostname at all.
        """
        self.assertRaises(ValueError, self._load, [])

    def test_readableSecretIsRefused(self) -> None:
        """
        A secret in the state directory that others can read is refused
        rather than used: it may already have leaked.
        """
        self._load()
        self.state.child(SIGNING_KEY_NAME).chmod(0o644)
        self.assertRaises(InsecureFileError, self._load)

    def test_reprHidesKeys(self) -> None:
        """
        The repr of L{RelayKeys} (what a log line would show) holds no key
        material.
        """
        keys, _ = self._load()
        text = repr(keys)
        self.assertNotIn("PRIVATE", text)
        self.assertNotIn("signing_key", text)

    def test_accepted_keys(self) -> None:
        """
        The public halves of the keys in accepted-keys/ (public or private PEM)
        are the ring's older keys; none without the folder.
        """
        self.assertEqual(self._load()[0].accepted, ())
        folder = self.state.child(ACCEPTED_KEYS_DIR)
        folder.makedirs()
        public, private = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        folder.child("a.pem").setContent(
            public.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        write_secret(
            folder.child("b.pem"),
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        self.assertEqual(
            [k.public_bytes(*raw) for k in self._load()[0].accepted],
            [public.public_key().public_bytes(*raw), private.public_key().public_bytes(*raw)],
        )

    def test_accepted_key_not_ed25519(self) -> None:
        """A key of another kind in accepted-keys/ is refused by name."""
        self._load()
        folder = self.state.child(ACCEPTED_KEYS_DIR)
        folder.makedirs()
        folder.child("ec.pem").setContent(
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.assertRaisesRegex(ValueError, "ec.pem is not an Ed25519 key", self._load)


class GivenPairTests(TestCase):
    """
    L{load_or_create} with an operator-supplied certificate chain and key.
    """

    def setUp(self) -> None:
        self.root = FilePath(self.mktemp())
        self.root.makedirs()
        self.state = self.root.child("state")
        self.ca_key, self.intermediate_key, self.leaf_key = _new_key(), _new_key(), _new_key()
        self.ca = _issue("Test Root", self.ca_key, ca=True, lifetime=3650 * ONE_DAY)
        self.intermediate = _issue(
            "Test Intermediate", self.intermediate_key, (self.ca, self.ca_key), ca=True
        )
        self.leaf = _issue(
            "relay",
            self.leaf_key,
            (self.intermediate, self.intermediate_key),
            hostnames=["localhost"],
        )

    def _files(self, cert_pem: bytes, key_pem: bytes) -> tuple[FilePath[str], FilePath[str]]:
        cert, key = self.root.child("fullchain.pem"), self.root.child("privkey.pem")
        cert.setContent(cert_pem)
        key.setContent(key_pem)
        return cert, key

    def _load(self, cert: FilePath[str] | None, key: FilePath[str] | None) -> RelayKeys:
        keys, created = load_or_create(
            self.state, tls_cert=cert, tls_key=key, hostnames=DEFAULT_HOSTNAMES
        )
        self.assertFalse(created)
        return keys

    def test_chainLoads(self) -> None:
        """
        A leaf-first chain and its key are loaded as they are; no dev
        certificate is made, but the signing key still is.
        """
        cert, key = self._files(_cert_pem(self.leaf, self.intermediate), _key_pem(self.leaf_key))
        keys = self._load(cert, key)
        self.assertEqual(
            x509.load_pem_x509_certificates(keys.tls_cert_pem), [self.leaf, self.intermediate]
        )
        self.assertEqual(
            keys.tls_key_pem.strip(), _key_pem(self.leaf_key).strip(), "same key, PKCS8 PEM"
        )
        self.assertEqual(sorted(self.state.listdir()), [SIGNING_KEY_NAME])

    def test_mismatchedPair(self) -> None:
        """
        A key that does not belong to the leaf certificate is refused, with
        both file names in the message.
        """
        cert, key = self._files(_cert_pem(self.leaf, self.intermediate), _key_pem(_new_key()))
        error = self.assertRaises(ValueError, self._load, cert, key)
        self.assertIn(cert.path, str(error))
        self.assertIn(key.path, str(error))

    def test_leafNotFirst(self) -> None:
        """
        A chain with the intermediate before the leaf is refused.
        """
        cert, key = self._files(_cert_pem(self.intermediate, self.leaf), _key_pem(self.leaf_key))
        error = self.assertRaises(ValueError, self._load, cert, key)
        self.assertIn("leaf", str(error))

    def test_missingFile(self) -> None:
        """
        A certificate or key file that cannot be read is a L{ValueError}
        naming the file.
        """
        cert, key = self._files(_cert_pem(self.leaf), _key_pem(self.leaf_key))
        missing = self.root.child("nope.pem")
        self.assertIn(missing.path, str(self.assertRaises(ValueError, self._load, missing, key)))
        self.assertIn(missing.path, str(self.assertRaises(ValueError, self._load, cert, missing)))

    def test_notPEM(self) -> None:
        """
        Files that hold no certificate, or no key, are refused.
        """
        cert, key = self._files(b"junk", _key_pem(self.leaf_key))
        self.assertRaises(ValueError, self._load, cert, key)
        cert, key = self._files(_cert_pem(self.leaf), b"junk")
        self.assertRaises(ValueError, self._load, cert, key)

    def test_certificateWithoutKey(self) -> None:
        """
        Giving only one of the certificate and the key is an error.
        """
        cert, key = self._files(_cert_pem(self.leaf), _key_pem(self.leaf_key))
        self.assertRaises(ValueError, self._load, cert, None)
        self.assertRaises(ValueError, self._load, None, key)


class FingerprintTests(TestCase):
    """
    L{fingerprint}.
    """

    def test_format(self) -> None:
        """
        The fingerprint is the SHA-256 of the leaf's DER as 32 colon-separated
        upper-case hex pairs, like C{openssl x509 -fingerprint -sha256}; the
        certificates after the leaf do not change it.
        """
        key = _new_key()
        leaf = _issue("leaf", key)
        other = _issue("other", _new_key())
        result = fingerprint(_cert_pem(leaf, other))
        self.assertRegex(result, r"\A[0-9A-F]{2}(:[0-9A-F]{2}){31}\Z")
        digest = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
        self.assertEqual(result.replace(":", "").lower(), digest)
        self.assertEqual(fingerprint(_cert_pem(leaf)), result)

    def test_notPEM(self) -> None:
        """
        Data holding no certificate is a L{ValueError}.
        """
        self.assertRaises(ValueError, fingerprint, b"not a certificate")


class DefaultStateDirTests(TestCase):
    """
    L{default_state_dir}.
    """

    def _setenv(self, name: str, value: str | None) -> None:
        old = os.environ.get(name)
        self.addCleanup(self._restore, name, old)
        self._restore(name, value)

    def _restore(self, name: str, value: str | None) -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def test_xdgStateHome(self) -> None:
        """
        C{$XDG_STATE_HOME} is used when set.
        """
        self._setenv("XDG_STATE_HOME", "/srv/state")
        self.assertEqual(default_state_dir(), FilePath("/srv/state/coder1-relay"))

    def test_fallback(self) -> None:
        """
        Without C{$XDG_STATE_HOME}, or with a relative one (which the XDG spec
        says to ignore), the directory is under C{~/.local/state}.
        """
        self._setenv("HOME", "/home/someone")
        expected = FilePath("/home/someone/.local/state/coder1-relay")
        self._setenv("XDG_STATE_HOME", None)
        self.assertEqual(default_state_dir(), expected)
        self._setenv("XDG_STATE_HOME", "relative/state")
        self.assertEqual(default_state_dir(), expected)


def _tls_transport(protocol: Protocol) -> TLSMemoryBIOProtocol:
    # mypy runs without the zope plugin, so it cannot call methods through an
    # interface type; narrow to the concrete transport these tests always use.
    transport = protocol.transport
    assert isinstance(transport, TLSMemoryBIOProtocol)
    return transport


def _server_transport(protocol: Protocol) -> TLSServerProtocol:
    transport = protocol.transport
    assert isinstance(transport, TLSServerProtocol)
    return transport


class _Echo(Protocol):
    """
    Echoes what it receives; C{lost} fires once the connection is gone.
    """

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        _server_transport(self).write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class _EchoFactory(Factory):
    def __init__(self) -> None:
        self.connections: list[_Echo] = []

    def buildProtocol(self, addr: IAddress | None) -> _Echo:
        protocol = _Echo()
        self.connections.append(protocol)
        return protocol


class _Client(Protocol):
    """
    Sends a ping once connected.  C{result} fires with the negotiated TLS
    version when the echo comes back, which proves the handshake (including
    hostname verification) succeeded; or fails with why the connection was
    lost before that.
    """

    def __init__(self) -> None:
        self.result: Deferred[str] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        _tls_transport(self).write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        if not self.result.called:
            self.result.callback(_tls_transport(self).getHandle().get_protocol_version_name())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.result.called:
            self.result.errback(reason)
        self.lost.callback(None)


class TLSTests(TestCase):
    """
    Real TLS between L{server_ssl_context} and L{client_tls_options} over
    loopback TCP.
    """

    def setUp(self) -> None:
        self.keys, _ = load_or_create(
            FilePath(self.mktemp()), tls_cert=None, tls_key=None, hostnames=DEFAULT_HOSTNAMES
        )

    async def _serve(self, keys: RelayKeys) -> int:
        """
        Listen on loopback with C{keys}; return the port number.
        """
        factory = _EchoFactory()
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        context = server_ssl_context(keys)
        port = await endpoint.listen(TLSServerFactory(lambda: context, IProtocolFactory(factory)))
        self.addCleanup(self._close_server_connections, factory)
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    def _close_server_connections(self, factory: _EchoFactory) -> Deferred[list[None]]:
        for each in factory.connections:
            if not each.lost.called:
                _server_transport(each).abortConnection()
        return gatherResults([each.lost for each in factory.connections])

    async def _connect(self, port: int, creator: IOpenSSLClientConnectionCreator) -> str:
        """
        Connect, ping, and return the negotiated TLS version.
        """
        tls_factory = TLSMemoryBIOFactory(
            creator, True, IProtocolFactory(Factory.forProtocol(_Client))
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        wrapper = await endpoint.connect(IProtocolFactory(tls_factory))
        assert isinstance(wrapper, TLSMemoryBIOProtocol)
        client = wrapper.wrappedProtocol
        assert isinstance(client, _Client)
        self.addCleanup(self._close_client, client)
        return await client.result

    def _close_client(self, client: _Client) -> Deferred[None]:
        if not client.lost.called:
            _tls_transport(client).loseConnection()
        return client.lost

    async def test_pinnedDevCertificate(self) -> None:
        """
        A client that trusts the dev certificate completes a TLS 1.3
        handshake with the relay, by name and by either IP address.
        """
        port = await self._serve(self.keys)
        for hostname in DEFAULT_HOSTNAMES:
            creator = client_tls_options(hostname, self.keys.tls_cert_pem)
            self.assertEqual(await self._connect(port, creator), "TLSv1.3", hostname)

    async def test_chainToRoot(self) -> None:
        """
        The server sends its intermediates, so a client that trusts only the
        root accepts a leaf signed by an intermediate; every certificate in a
        CA PEM is trusted, not only the first.
        """
        root_key, intermediate_key, leaf_key = _new_key(), _new_key(), _new_key()
        root = _issue("Test Root", root_key, ca=True)
        intermediate = _issue("Test Intermediate", intermediate_key, (root, root_key), ca=True)
        leaf = _issue("relay", leaf_key, (intermediate, intermediate_key), hostnames=["localhost"])
        keys = RelayKeys(
            tls_cert_pem=_cert_pem(leaf, intermediate),
            tls_key_pem=_key_pem(leaf_key),
            signing_key=self.keys.signing_key,
        )
        port = await self._serve(keys)
        trusted = _cert_pem(_issue("Unrelated Root", _new_key(), ca=True), root)
        version = await self._connect(port, client_tls_options("localhost", trusted))
        self.assertEqual(version, "TLSv1.3")

    async def test_tls12Refused(self) -> None:
        """
        A client that trusts the certificate but cannot speak TLS 1.3 is
        refused.
        """
        port = await self._serve(self.keys)
        creator = optionsForClientTLS(
            "localhost",
            trustRoot=Certificate.loadPEM(self.keys.tls_cert_pem),
            extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2},
        )
        with self.assertRaises(SSL.Error):
            await self._connect(port, creator)

    async def test_untrustedCertificate(self) -> None:
        """
        A client that does not trust the relay's certificate fails the
        handshake, even when the certificate names the right host.
        """
        port = await self._serve(self.keys)
        other = _cert_pem(_issue("other", _new_key(), hostnames=["localhost"]))
        with self.assertRaises(SSL.Error) as caught:
            await self._connect(port, client_tls_options("localhost", other))
        self.assertIn("certificate verify failed", str(caught.exception))

    async def test_hostnameMismatch(self) -> None:
        """
        A certificate the client trusts but that was issued for other names
        is refused: hostname verification is always on.
        """
        port = await self._serve(self.keys)
        with self.assertRaises(VerificationError):
            await self._connect(port, client_tls_options("example.com", self.keys.tls_cert_pem))

    def test_noSessionTickets(self) -> None:
        """
        The server neither issues session tickets nor resumes sessions: a
        ticket key kept in memory would let whoever steals it decrypt recorded
        traffic, defeating forward secrecy.
        """
        context = server_ssl_context(self.keys)
        self.assertTrue(context.options & ssl.OP_NO_TICKET)
        self.assertEqual(context.num_tickets, 0)
        self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_3)

    def test_caDataWithoutCertificate(self) -> None:
        """
        CA data that holds no certificate is a L{ValueError}, not a client
        that silently trusts nothing (or everything).
        """
        self.assertRaises(ValueError, client_tls_options, "localhost", b"junk")
