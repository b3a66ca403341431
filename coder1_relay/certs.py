"""
The relay's keys: its TLS certificate, the key it signs session tokens with,
and the TLS settings both ends use (TLS 1.3 only, verification always on).

Without an operator-supplied certificate the relay makes a self-signed
development certificate; bridges pin it with C{--ca-cert} (or compare
L{fingerprint}s), since no public CA vouches for it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.python.filepath import FilePath

from coder1_wire.secretfile import check_private, read_secret, write_secret

DEV_CERT_NAME = "dev-cert.pem"
DEV_KEY_NAME = "dev-key.pem"
SIGNING_KEY_NAME = "signing-key.pem"
#: Keys signed with before a rotation, whose tokens are still accepted (PEM, public or private).
ACCEPTED_KEYS_DIR = "accepted-keys"

DEV_CERT_LIFETIME = datetime.timedelta(days=365)
#: A dev certificate closer than this to expiry is replaced at startup.
DEV_CERT_RENEW_BEFORE = datetime.timedelta(days=7)
#: Backdating covers clients whose clocks run a little behind ours.
DEV_CERT_BACKDATE = datetime.timedelta(minutes=5)
DEV_CERT_SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coder1-relay development")])

_SanName = str | ipaddress.IPv4Address | ipaddress.IPv6Address
#: Private keys a TLS server certificate can have.
_TlsKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey | Ed448PrivateKey


@attrs.frozen
class RelayKeys:
    """
    Everything secret the relay holds.  The repr leaves key material out so
    that logging this object cannot leak it.
    """

    #: PEM, leaf first, then intermediates.
    tls_cert_pem: bytes
    tls_key_pem: bytes = attrs.field(repr=False)
    #: Signs session tokens (JWT, EdDSA).
    signing_key: Ed25519PrivateKey = attrs.field(repr=False)
    #: Older signing keys (public halves) whose tokens are still accepted.
    accepted: tuple[Ed25519PublicKey, ...] = ()


def default_state_dir() -> FilePath[str]:
    """
    C{$XDG_STATE_HOME/coder1-relay}, or C{~/.local/state/coder1-relay}.
    """
    base = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says to ignore a relative value.
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return FilePath(base).child("coder1-relay")


def load_or_create(
    state_dir: FilePath[str],
    *,
    tls_cert: FilePath[str] | None,
    tls_key: FilePath[str] | None,
    hostnames: Sequence[str],
) -> tuple[RelayKeys, bool]:
    """
    Load the relay's keys from C{state_dir}, creating whatever is missing.

    The TLS pair is C{tls_cert} and C{tls_key} when given, otherwise the dev
    certificate in C{state_dir}, (re)generated when it is missing, expires
    within L{DEV_CERT_RENEW_BEFORE} or does not cover every one of
    C{hostnames}.

    @return: the keys, and whether a new dev certificate was made (its
        fingerprint changed, so pinned bridges need the new one).
    @raise ValueError: if the given TLS pair cannot be loaded, or a key in
        C{state_dir} is corrupt.
    @raise InsecureFileError: if a secret in C{state_dir} is readable by
        others.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("give both a TLS certificate and its key, or neither")
    created = False
    if tls_cert is not None and tls_key is not None:
        cert_pem, key_pem = _load_given_pair(tls_cert, tls_key)
    else:
        cert_pem, key_pem, created = _load_or_create_dev_pair(state_dir, hostnames)
    keys = RelayKeys(
        tls_cert_pem=cert_pem,
        tls_key_pem=key_pem,
        signing_key=_load_or_create_signing_key(state_dir.child(SIGNING_KEY_NAME)),
        accepted=_load_accepted_keys(state_dir.child(ACCEPTED_KEYS_DIR)),
    )
    return keys, created


def _load_accepted_keys(folder: FilePath[str]) -> tuple[Ed25519PublicKey, ...]:
    """Every Ed25519 key, public or private, in C{folder}'s C{*.pem} files (none: no folder)."""
    if not folder.isdir():
        return ()
    found = []
    for path in sorted(folder.globChildren("*.pem")):
        pem = path.getContent()
        try:
            if b"PRIVATE KEY" in pem:
                check_private(path)
                key: object = serialization.load_pem_private_key(pem, None).public_key()
            else:
                key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path.path} is not a PEM key: {e}") from e
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path.path} is not an Ed25519 key")
        found.append(key)
    return tuple(found)


def fingerprint(cert_pem: bytes) -> str:
    """
    The SHA-256 fingerprint of the first (leaf) certificate in C{cert_pem},
    formatted like C{openssl x509 -fingerprint -sha256}: C{"AB:CD:..."}.
    """
    leaf = _parse_certs(cert_pem, "certificate data")[0]
    return leaf.fingerprint(hashes.SHA256()).hex(":").upper()


def server_ssl_context(keys: RelayKeys) -> ssl.SSLContext:
    """
    Server TLS settings, for L{coder1_relay.tls_server}: TLS 1.3 only, the
    whole chain sent, no session resumption (no session tickets at all, so
    nothing is kept to resume from: docs/security.md, section 9).

    @raise ssl.SSLError: if OpenSSL refuses the pair.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.options |= ssl.OP_NO_TICKET | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.num_tickets = 0
    _load_pair(context, keys.tls_cert_pem + keys.tls_key_pem)
    return context


def _load_pair(context: ssl.SSLContext, pem: bytes) -> None:
    """
    Load the chain and key in C{pem} into C{context}, which reads them only
    from a file: one in memory (Linux), else an unnamed temporary file.
    """
    with (
        os.fdopen(os.memfd_create("coder1-relay-tls", os.MFD_CLOEXEC), "w+b")
        if hasattr(os, "memfd_create")
        else tempfile.TemporaryFile()
    ) as held:
        held.write(pem)
        held.flush()
        held.seek(0)  # where /dev/fd shares the offset (macOS)
        context.load_cert_chain(f"/dev/fd/{held.fileno()}")


def _parse_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ValueError(f"no valid PEM certificate in the {what}") from e


def _load_tls_key(pem: bytes, where: str) -> _TlsKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        # TypeError: the key is encrypted; we have no way to ask for a password.
        # cryptography's own words name its parser, not what to do.
        raise ValueError(f"{where} is not an unencrypted PEM private key") from e
    if not isinstance(key, _TlsKey):
        raise ValueError(f"{where} holds a {type(key).__name__}, not a TLS server key")
    return key


def _private_key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _chain_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(each.public_bytes(serialization.Encoding.PEM) for each in certs)


def _matches(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _load_given_pair(cert_path: FilePath[str], key_path: FilePath[str]) -> tuple[bytes, bytes]:
    try:
        cert_data = cert_path.getContent()
        key_data = read_secret(key_path)
    except OSError as e:
        raise ValueError(f"cannot read the TLS certificate or key: {e}") from e
    certs = _parse_certs(cert_data, f"TLS certificate file {cert_path.path}")
    key = _load_tls_key(key_data, key_path.path)
    if not _matches(certs[0], key):
        raise ValueError(
            f"the key in {key_path.path} does not match the first certificate in "
            f"{cert_path.path} (the leaf certificate must come first)"
        )
    return _chain_pem(certs), _private_key_pem(key)


def _load_or_create_dev_pair(
    state_dir: FilePath[str], hostnames: Sequence[str]
) -> tuple[bytes, bytes, bool]:
    wanted = {_san_name(each) for each in hostnames}
    if not wanted:
        raise ValueError("the dev certificate needs at least one hostname")
    cert_path = state_dir.child(DEV_CERT_NAME)
    key_path = state_dir.child(DEV_KEY_NAME)
    existing = _load_dev_pair(cert_path, key_path)
    if existing is not None and _still_good(existing[0], wanted):
        return _chain_pem([existing[0]]), _private_key_pem(existing[1]), False
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem = _self_signed(key, wanted).public_bytes(serialization.Encoding.PEM)
    key_pem = _private_key_pem(key)
    # Key first: a crash in between leaves a mismatched pair, which the next
    # start detects and replaces.
    write_secret(key_path, key_pem)
    write_secret(cert_path, cert_pem)
    return cert_pem, key_pem, True


def _load_dev_pair(
    cert_path: FilePath[str], key_path: FilePath[str]
) -> tuple[x509.Certificate, _TlsKey] | None:
    """
    The dev pair from disk, or L{None} if it is missing, corrupt or
    mismatched: it is ours to replace.
    """
    if not (cert_path.exists() and key_path.exists()):
        return None
    check_private(key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.getContent())
        key = _load_tls_key(read_secret(key_path), key_path.path)
    except ValueError:
        return None
    return (cert, key) if _matches(cert, key) else None


def _still_good(cert: x509.Certificate, wanted: set[_SanName]) -> bool:
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc - now < DEV_CERT_RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have: set[_SanName] = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    have.update(
        ip
        for ip in san.get_values_for_type(x509.IPAddress)
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    )
    return wanted <= have


def _san_name(hostname: str) -> _SanName:
    try:
        return ipaddress.ip_address(hostname)
    except ValueError:
        return hostname.lower()


def _self_signed(key: ec.EllipticCurvePrivateKey, names: set[_SanName]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [
        x509.DNSName(name) if isinstance(name, str) else x509.IPAddress(name)
        for name in sorted(names, key=str)
    ]
    return (
        x509.CertificateBuilder()
        .subject_name(DEV_CERT_SUBJECT)
        .issuer_name(DEV_CERT_SUBJECT)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DEV_CERT_BACKDATE)
        .not_valid_after(now + DEV_CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _load_or_create_signing_key(path: FilePath[str]) -> Ed25519PrivateKey:
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        write_secret(path, _private_key_pem(key))
        return key
    check_private(path)
    try:
        loaded = serialization.load_pem_private_key(read_secret(path), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path.path} is not a PEM private key: {e}") from e
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path.path} is not an Ed25519 key")
    return loaded
