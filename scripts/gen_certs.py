"""Development credentials for the multi-node deployment (deploy/ + docker-compose.yml).

Writes into OUT_DIR (default deploy/certs/, gitignored):

    ca.crt, ca.key                  a self-signed development CA (EC P-384)
    server.pem, server.key          the SuperLink's TLS certificate, signed by the CA; SANs: 127.0.0.1, ::1,
                                    localhost, and the compose service name (`superlink`)
    <node>.pem, <node>.key          one TLS certificate per SuperNode for its Runtime API (SAN: its compose
                                    service name, localhost, 127.0.0.1), for SuperExec in `--isolation process`
    <node>_auth, <node>_auth.pub    one node-authentication key pair per SuperNode (EC P-384, OpenSSH format):
                                    the private key stays on the node (`--auth-supernode-private-key`), the
                                    public key is registered at the SuperLink (`flwr supernode register`)

For development and tests only: in production use your organisation's CA and let each organisation generate
its own auth key pair and send only the `.pub` file to the federation operator.

    python scripts/gen_certs.py [OUT_DIR] [--nodes supernode-1,supernode-2] [--server-name superlink]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deploy.topology import DEFAULT as TOPOLOGY  # noqa: E402

VALID_DAYS = 365
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def validity(days: float = VALID_DAYS, start_days: float = 0.0) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after): from `start_days` from now (minus 5 minutes of clock skew) for `days` days.

    Tests build expired (start_days=-10, days=1) or not-yet-valid (start_days=+10) certificates with it.
    """
    start = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=start_days) - dt.timedelta(minutes=5)
    return start, start + dt.timedelta(days=days)


def make_ca(out: Path, valid: tuple[dt.datetime, dt.datetime] | None = None
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    not_before, not_after = valid or validity()
    cert = (x509.CertificateBuilder().subject_name(_name("fedlora development CA"))
            .issuer_name(_name("fedlora development CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(key), private=True)
    return cert, key


def make_server_cert(out: Path, stem: str, dns_names: list[str], ca_cert: x509.Certificate,
                     ca_key: ec.EllipticCurvePrivateKey, valid: tuple[dt.datetime, dt.datetime] | None = None) -> None:
    """`<stem>.pem` / `<stem>.key`: a TLS server certificate for these DNS names and the loopback IPs."""
    key = _key()
    not_before, not_after = valid or validity()
    names = list(dict.fromkeys([*dns_names, *LOOPBACK_NAMES]))
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOOPBACK_IPS]
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / f"{stem}.key", _pem_key(key), private=True)


def make_auth_keys(out: Path, stem: str) -> None:
    """`<stem>` (OpenSSH private key) and `<stem>.pub` (OpenSSH public key), EC P-384, as Flower expects."""
    key = _key()
    _write(out / stem, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / f"{stem}.pub", public + f" {stem}\n".encode())


def generate(out: Path, nodes: list[str], server_name: str) -> Path:
    """Write the CA, the SuperLink's and each node's certificate, and each node's auth key pair."""
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(out)
    make_server_cert(out, "server", [server_name], ca_cert, ca_key)
    for node in nodes:
        make_server_cert(out, node, [node], ca_cert, ca_key)
        make_auth_keys(out, f"{node}_auth")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=str(REPO / TOPOLOGY.certs_dir),
                        help="output directory (default: deploy/certs/)")
    parser.add_argument("--nodes", default=",".join(n.service for n in TOPOLOGY.supernodes),
                        help="comma-separated SuperNode names (default: the compose SuperNode services)")
    parser.add_argument("--server-name", default=TOPOLOGY.superlink_service,
                        help="DNS name of the SuperLink in the certificate, besides localhost/127.0.0.1")
    args = parser.parse_args(argv)
    nodes = [n for n in args.nodes.split(",") if n]
    out = generate(Path(args.out_dir), nodes, args.server_name)
    print(f"wrote development CA, SuperLink certificate ({args.server_name}, localhost, 127.0.0.1) and "
          f"{len(nodes)} SuperNode certificates + auth key pairs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
