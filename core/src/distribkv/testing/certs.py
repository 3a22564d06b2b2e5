"""Certificates for tests of ``[tls]`` clusters, made on the spot with ``cryptography`` (a
test dependency): a CA, one node certificate whose IP addresses cover every node, a client
certificate, and a second CA that signed nothing the nodes trust.

    from distribkv.testing.certs import make_certificates

    certs = make_certificates(tmp_path / "tls", ["127.4.0.1", "127.4.0.2"])
    certs.ca, certs.node_cert, certs.node_key, certs.client_cert, certs.client_key

Keys are ECDSA P-256 (fast to make, and both rustls and OpenSSL take them); every key file is
written with mode 0600, as ``[tls] key`` must be.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

import attrs

__all__ = ["Certificates", "make_certificates"]


@attrs.frozen
class Certificates:
    ca: Path
    node_cert: Path
    node_key: Path
    client_cert: Path
    client_key: Path
    #: A CA of its own, and a client certificate it signed: trusted by no node.
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def make_certificates(directory: Path, hosts: Iterable[str]) -> Certificates:
    """Write a CA, a node certificate for ``hosts`` (IP addresses or names) and client
    certificates into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def write_key(path: Path, key) -> None:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)

    def authority(label: str):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name(label))
            .issuer_name(name(label))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, certificate

    def issue(ca, label: str, sans: list, usages: list):
        ca_key, ca_cert = ca
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(label))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    def save(stem: str, pair) -> tuple[Path, Path]:
        key, certificate = pair
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        write_key(key_path, key)
        return cert_path, key_path

    sans: list = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    ca = authority("distribkv test CA")
    other = authority("another CA")
    ca_path, _ = save("ca", ca)
    other_path, _ = save("other-ca", other)
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    node_cert, node_key = save("node", issue(ca, "distribkv node", sans, both))
    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    client_cert, client_key = save("client", issue(ca, "distribkv client", [], client))
    other_cert, other_key = save("other-client", issue(other, "stranger", [], client))
    return Certificates(
        ca_path, node_cert, node_key, client_cert, client_key, other_path, other_cert, other_key
    )
