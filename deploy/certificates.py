"""Certificate checks a deployment runs before Flower starts: an expired or wrong certificate is a clear
one-line error at start, on the SuperLink (its own certificate) and on a SuperNode (its CA, its Runtime API
certificate, and the certificate the SuperLink actually presents), instead of a TLS failure deep in gRPC.

Pure functions over PEM files (the `cryptography` package), plus `probe_server`, a TLS handshake against a
running SuperLink with the SuperNode's CA. Every failure raises `CertificateProblem` with what is wrong,
which file, and what to do.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

REGENERATE = "regenerate the development certificates with `python scripts/gen_certs.py` (or renew yours)"


class CertificateProblem(Exception):
    """A certificate, key or TLS peer that the deployment cannot use; the message says which and why."""


def load_certificate(path: str | Path) -> x509.Certificate:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CertificateProblem(f"certificate {path}: cannot read it ({err.strerror}); is the certificates "
                                 "directory mounted?") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateProblem(f"certificate {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def check_valid_now(cert: x509.Certificate, path: str | Path, now: dt.datetime | None = None) -> None:
    """Refuse a certificate outside its validity window, saying when it ended or begins."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise CertificateProblem(f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
                                 f"(now {now:%Y-%m-%d %H:%M} UTC): {REGENERATE}")
    if now < cert.not_valid_before_utc:
        raise CertificateProblem(f"certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
                                 f" UTC (now {now:%Y-%m-%d %H:%M} UTC): check this machine's clock")


def check_issued_by(cert: x509.Certificate, path: str | Path, ca: x509.Certificate, ca_path: str | Path) -> None:
    """Refuse a certificate that the given CA did not sign (a certificate from another deployment)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateProblem(f"certificate {path} (issuer {cert.issuer.rfc4514_string()}) was not issued by "
                                 f"the CA in {ca_path} ({ca.subject.rfc4514_string()}): use the certificate and "
                                 f"CA from the same run of scripts/gen_certs.py") from None


def check_key_matches(cert: x509.Certificate, path: str | Path, key_path: str | Path) -> None:
    key_path = Path(key_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as err:
        raise CertificateProblem(f"private key {key_path}: cannot read it ({err.strerror})") from None
    except (ValueError, TypeError):
        raise CertificateProblem(f"private key {key_path} is not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CertificateProblem(f"private key {key_path} does not belong to certificate {path}")


def check_tls_files(ca_path: str | Path, cert_path: str | Path | None = None, key_path: str | Path | None = None,
                    now: dt.datetime | None = None) -> None:
    """The CA is valid now; the certificate (if given) is valid now, signed by that CA, and matches its key."""
    ca = load_certificate(ca_path)
    check_valid_now(ca, ca_path, now)
    if cert_path is None:
        return
    cert = load_certificate(cert_path)
    check_valid_now(cert, cert_path, now)
    check_issued_by(cert, cert_path, ca, ca_path)
    if key_path is not None:
        check_key_matches(cert, cert_path, key_path)


def probe_server(address: str, ca_path: str | Path, timeout: float = 5.0) -> bool:
    """TLS handshake with the server at HOST:PORT, trusting only `ca_path`; True if it verified.

    False when nothing answers (connection refused, timeout): the server may not be up yet and Flower retries.
    A server that answers with a certificate this CA cannot verify (expired, another CA, wrong host name)
    raises CertificateProblem: retrying would never succeed.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca_path))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except ssl.SSLCertVerificationError as err:
        raise CertificateProblem(f"the server at {address} presented a certificate that {ca_path} cannot verify: "
                                 f"{_reason(err)}") from None
    except (OSError, ssl.SSLError):
        return False


def _reason(err: ssl.SSLCertVerificationError) -> str:
    message = err.verify_message or str(err)
    if "expired" in message:
        return f"{message} (the server's certificate must be renewed: {REGENERATE})"
    if "issuer" in message or "self-signed" in message or "self signed" in message:
        return f"{message} (it was issued by another CA: give this node the CA that signed the server's certificate)"
    if "mismatch" in message or "match" in message:
        return f"{message} (the certificate does not name this address: regenerate it with --server-name)"
    return message
