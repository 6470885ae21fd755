"""A self-signed TLS certificate for the emulator, made with ``cryptography``.

Real MVI installations mostly run with self-signed certificates, so the emulator does too;
tests pass the certificate's path as ``verify=`` to check that verification really happens.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

_DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


def write_self_signed(directory: Path, host: str) -> tuple[Path, Path]:
    """Write a self-signed certificate and its key (both PEM) into ``directory``.

    The certificate names ``localhost``, ``127.0.0.1``, ``::1`` and ``host``; it is valid from a
    day ago for a year. Returns ``(cert_path, key_path)``; the key file is readable by the
    owner only.
    """
    # P-256 keys are generated in milliseconds, which keeps start-up fast.
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys((*_DEFAULT_NAMES, host)))
    alt_names: list[x509.GeneralName] = []
    for name in names:
        if not name or name in ("0.0.0.0", "::"):
            continue
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "paiv-sync emulator")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        # A self-signed leaf used directly as its own trust anchor; these extensions keep it
        # acceptable to OpenSSL's strict verification (the default from Python 3.13 on).
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "emulator-cert.pem"
    key_path = directory / "emulator-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    log.debug("emulator: self-signed certificate for %s written to %s", names, cert_path)
    return cert_path, key_path


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """Return a server-side TLS context serving the given certificate and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context
