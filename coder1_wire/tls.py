"""TLS settings for reaching the relay: TLS 1.3 only, verification always on."""

from __future__ import annotations

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)


def client_tls_options(hostname: str, ca_cert_pem: bytes | None) -> IOpenSSLClientConnectionCreator:
    """
    Client TLS settings for reaching the relay at C{hostname}: TLS 1.3 only,
    certificate and hostname always verified.

    @param ca_cert_pem: the only certificates to trust (CAs, or a pinned
        self-signed certificate), or L{None} for the platform's CAs.
    """
    if ca_cert_pem is None:
        trust_root = platformTrust()
    else:
        trust_root = trustRootFromCertificates(
            [Certificate(crypto.X509.from_cryptography(each)) for each in _parse_certs(ca_cert_pem)]
        )
    return optionsForClientTLS(
        hostname,
        trustRoot=trust_root,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
    )


def _parse_certs(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ValueError("no valid PEM certificate in the CA certificate data") from e
