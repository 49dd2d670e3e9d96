"""deploy.certificates and the preflight that runs it: expired, not-yet-valid, foreign and mismatched
certificates are refused with a message that names the file and the fix; a TLS probe against a real server
tells "not up yet" (retry) from "presents a certificate we cannot verify" (refuse)."""

from __future__ import annotations

import socket
import ssl
import threading
from contextlib import contextmanager

import pytest

from deploy.certificates import CertificateProblem, check_tls_files, probe_server
from deploy.preflight import main as preflight
from deploy.topology import DEFAULT
from scripts.gen_certs import generate, make_ca, make_server_cert, validity


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A good deployment's certificates, plus bad server certificates signed by the same CA and a foreign CA."""
    root = tmp_path_factory.mktemp("certs")
    good = generate(root / "good", ["supernode-1"], "superlink")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_cert = x509.load_pem_x509_certificate((good / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((good / "ca.key").read_bytes(), password=None)
    make_server_cert(good, "expired", ["superlink"], ca_cert, ca_key, valid=validity(days=1, start_days=-10))
    make_server_cert(good, "future", ["superlink"], ca_cert, ca_key, valid=validity(start_days=10))
    foreign = root / "foreign"
    foreign.mkdir()
    other_cert, other_key = make_ca(foreign)
    make_server_cert(foreign, "server", ["superlink"], other_cert, other_key)
    expired_ca = root / "expired-ca"
    expired_ca.mkdir()
    make_ca(expired_ca, valid=validity(days=1, start_days=-10))
    return {"good": good, "foreign": foreign, "expired_ca": expired_ca}


def test_a_good_deployment_passes(certs):
    good = certs["good"]
    check_tls_files(good / "ca.crt", good / "server.pem", good / "server.key")
    check_tls_files(good / "ca.crt", good / "supernode-1.pem", good / "supernode-1.key")
    check_tls_files(good / "ca.crt")


@pytest.mark.parametrize("case, message", [
    ("expired", "expired on"),
    ("future", "is not valid before"),
    ("foreign", "was not issued by the CA in"),
    ("mismatched key", "does not belong to certificate"),
    ("expired ca", "expired on"),
    ("missing", "cannot read it"),
    ("garbage", "is not a PEM certificate"),
])
def test_bad_certificates_are_refused_with_a_clear_message(certs, tmp_path, case, message):
    good, foreign = certs["good"], certs["foreign"]
    (tmp_path / "garbage.pem").write_text("not a certificate")
    ca, cert, key = {
        "expired": (good / "ca.crt", good / "expired.pem", good / "expired.key"),
        "future": (good / "ca.crt", good / "future.pem", good / "future.key"),
        "foreign": (good / "ca.crt", foreign / "server.pem", foreign / "server.key"),
        "mismatched key": (good / "ca.crt", good / "server.pem", good / "supernode-1.key"),
        "expired ca": (certs["expired_ca"] / "ca.crt", None, None),
        "missing": (good / "ca.crt", tmp_path / "absent.pem", None),
        "garbage": (good / "ca.crt", tmp_path / "garbage.pem", None),
    }[case]
    with pytest.raises(CertificateProblem, match=message) as caught:
        check_tls_files(ca, cert, key)
    assert str(cert or ca) in str(caught.value) or str(key) in str(caught.value)


def test_superlink_preflight_refuses_an_expired_certificate(certs, capsys):
    good = certs["good"]
    command = DEFAULT.superlink_args(str(good), "127.0.0.1", 9, "/nonexistent/state.db")
    command[command.index("--ssl-certfile") + 1] = str(good / "expired.pem")
    command[command.index("--ssl-keyfile") + 1] = str(good / "expired.key")
    assert preflight(["--", *command]) == 2  # returns instead of exec'ing flower-superlink
    err = capsys.readouterr().err
    assert err.startswith("error: certificate ") and "expired on" in err and "gen_certs.py" in err


def test_preflight_refuses_commands_it_does_not_know(capsys):
    assert preflight(["--", "flower-simulation", "--app", "."]) == 2
    assert "preflight checks flower-superlink and flower-supernode" in capsys.readouterr().err


@contextmanager
def tls_server(cert, key):
    """A one-thread TLS server on 127.0.0.1 that completes handshakes (what a SuperLink presents)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_probe_tells_not_up_yet_from_a_certificate_that_cannot_verify(certs):
    good, foreign = certs["good"], certs["foreign"]
    with tls_server(good / "server.pem", good / "server.key") as address:
        assert probe_server(address, good / "ca.crt") is True
    with tls_server(good / "expired.pem", good / "expired.key") as address:
        with pytest.raises(CertificateProblem, match="certificate has expired.*must be renewed"):
            probe_server(address, good / "ca.crt")
    with tls_server(foreign / "server.pem", foreign / "server.key") as address:
        with pytest.raises(CertificateProblem, match="issued by another CA"):
            probe_server(address, good / "ca.crt")
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert probe_server(f"127.0.0.1:{port}", good / "ca.crt", timeout=2) is False  # nothing there yet: retry
