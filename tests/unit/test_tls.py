"""TLS and mutual TLS on the gateway: real gRPC on loopback, with throwaway CAs made here
(the `cryptography` package), the gateway in this process on SQLite (no Ray).

gRPC shares connections between channels of the same target and options; every client
here takes a subchannel pool of its own, so each one makes its own TLS handshake."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import os
import socket
import ssl
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2
from pydantic import ValidationError
from typer.testing import CliRunner

from farm.api.server import CertificateFiles, Gateway
from farm.client import FarmClient
from farm.config import (
    FarmConfig,
    GatewayConfig,
    ModelConfig,
    Task,
    is_loopback,
)
from farm.families import Family
from tests.gateway import serving

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
CALL_TIMEOUT_S = 10


@dataclasses.dataclass
class Authority:
    """A CA that signs certificates for the tests."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> "Authority":
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(name, key, cert)

    def issue(self, common_name: str, server: bool) -> tuple[bytes, bytes, x509.Certificate]:
        """(certificate PEM, key PEM, certificate) for localhost and 127.0.0.1 (a server) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem, cert

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.pem"
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


@dataclasses.dataclass
class Pki:
    ca: Authority
    ca_file: Path
    other: Authority
    other_file: Path
    server_cert: Path
    server_key: Path
    served: x509.Certificate
    """The certificate the gateway starts with."""
    directory: Path

    def client_files(self, authority: Authority, name: str) -> tuple[Path, Path]:
        cert, key, _ = authority.issue(name, server=False)
        cert_file, key_file = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        return cert_file, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority.create("farm-test-ca"), Authority.create("another-ca")
    cert, key, served = ca.issue("farm-gateway", server=True)
    (directory / "server.crt").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    return Pki(ca, ca.write(directory), other, other.write(directory), directory / "server.crt",
               directory / "server.key", served, directory)


def farm_config(home: Path, **gateway) -> FarmConfig:
    model = ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "no-such-dir"})
    return FarmConfig(home=home, models=[model], gateway={"port": 0, "metrics_port": 0, **gateway})


def key_of(config: FarmConfig) -> str:
    return (config.keys_dir / "default.key").read_text().strip()


def served(client: FarmClient) -> bool:
    """Whether an authenticated call goes through; False where the connection is refused."""
    try:
        names = [m.name for m in client.models().models]
    except grpc.RpcError as error:
        # A handshake that fails is UNAVAILABLE; anything else would be a different fault.
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
        return False
    assert names == ["ltx"]
    return True


def client(target: str, key: str, **tls) -> FarmClient:
    return FarmClient(target, key, options=OWN_CONNECTION, **tls)


# Config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.9.8.7", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False), ("gateway.example", False),
])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_plaintext_is_refused_beyond_loopback(tmp_path):
    with pytest.raises(ValidationError, match="not a loopback address"):
        GatewayConfig(host="0.0.0.0")
    assert GatewayConfig(host="0.0.0.0", allow_plaintext=True).tls is False
    tls = GatewayConfig(host="0.0.0.0", tls_cert_file=tmp_path / "c", tls_key_file=tmp_path / "k")
    assert tls.tls is True
    assert GatewayConfig().tls is False, "plaintext on loopback stays the default"


def test_tls_settings_go_together(tmp_path):
    with pytest.raises(ValidationError, match="go together"):
        GatewayConfig(tls_cert_file=tmp_path / "c")
    with pytest.raises(ValidationError, match="needs gateway.tls_cert_file"):
        GatewayConfig(tls_client_ca_file=tmp_path / "ca")


def test_the_gateway_checks_its_address_again_at_start(tmp_path):
    config = farm_config(tmp_path)
    config.gateway.host = "0.0.0.0"  # assignment is not validated
    with pytest.raises(ValidationError, match="not a loopback address"):
        asyncio.run(Gateway(config).start())
    assert not (tmp_path / "farm.db").exists(), "nothing may start before the check"


def test_a_client_certificate_needs_its_key(pki):
    with pytest.raises(ValueError, match="needs its key"):
        FarmClient("127.0.0.1:1", tls_ca_file=pki.ca_file, tls_cert_file=pki.server_cert)


def test_the_gateway_will_not_start_on_a_key_that_does_not_match(tmp_path, pki):
    _, wrong_key, _ = pki.ca.issue("someone-else", server=True)
    (tmp_path / "wrong.key").write_bytes(wrong_key)
    with pytest.raises(ssl.SSLError):
        CertificateFiles(pki.server_cert, tmp_path / "wrong.key")


# TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory, pki):
    config = farm_config(tmp_path_factory.mktemp("farm"), tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    with serving(config) as local:
        yield local, key_of(config)


def test_a_tls_client_is_served(tls_gateway, pki):
    local, key = tls_gateway
    with client(local.target, key, tls_ca_file=pki.ca_file) as tls:
        assert served(tls)
    # The certificate names localhost too, and a name override checks that name instead.
    port = local.target.rpartition(":")[2]
    with client(f"localhost:{port}", key, tls_ca_file=pki.ca_file) as by_name:
        assert served(by_name)
    with client(local.target, key, tls_ca_file=pki.ca_file, tls_server_name="gateway.example") as wrong_name:
        assert not served(wrong_name), "a certificate that does not name the server must be refused"


def test_a_plaintext_client_is_refused(tls_gateway):
    local, key = tls_gateway
    with client(local.target, key) as plaintext:
        assert not served(plaintext)
        with pytest.raises(grpc.RpcError) as refused:
            plaintext.health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_trusts_another_ca_refuses_the_gateway(tls_gateway, pki):
    local, key = tls_gateway
    with client(local.target, key, tls_ca_file=pki.other_file) as distrustful:
        assert not served(distrustful)


def test_the_cli_speaks_tls_from_flags_and_environment(tls_gateway, pki, monkeypatch):
    from farm.cli.commands import app

    local, key = tls_gateway
    runner = CliRunner()
    plain = runner.invoke(app, ["models", "list", "--target", local.target, "--api-key", key])
    assert plain.exit_code != 0 and isinstance(plain.exception, grpc.RpcError)
    assert plain.exception.code() == grpc.StatusCode.UNAVAILABLE
    by_flag = runner.invoke(app, ["--tls-ca", str(pki.ca_file), "models", "list", "--target", local.target,
                                  "--api-key", key])
    assert by_flag.exit_code == 0, by_flag.output
    assert "ltx" in by_flag.output
    by_env = runner.invoke(app, ["models", "list", "--target", local.target, "--api-key", key],
                           env={"FARM_TLS_CA": str(pki.ca_file), "COLUMNS": "200"})
    assert by_env.exit_code == 0, by_env.output
    assert "ltx" in by_env.output


# Mutual TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_gateway(tmp_path_factory, pki):
    config = farm_config(tmp_path_factory.mktemp("farm"), tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                         tls_client_ca_file=pki.ca_file)
    with serving(config) as local:
        yield local, key_of(config)


def test_mtls_serves_a_client_with_a_certificate_of_the_ca(mtls_gateway, pki):
    local, key = mtls_gateway
    cert, cert_key = pki.client_files(pki.ca, "renderer")
    with client(local.target, key, tls_ca_file=pki.ca_file, tls_cert_file=cert, tls_key_file=cert_key) as good:
        assert served(good)


def test_mtls_refuses_a_client_without_a_certificate(mtls_gateway, pki):
    local, key = mtls_gateway
    with client(local.target, key, tls_ca_file=pki.ca_file) as anonymous:
        assert not served(anonymous)


def test_mtls_refuses_a_certificate_of_another_ca(mtls_gateway, pki):
    local, key = mtls_gateway
    cert, cert_key = pki.client_files(pki.other, "intruder")
    with client(local.target, key, tls_ca_file=pki.ca_file, tls_cert_file=cert, tls_key_file=cert_key) as intruder:
        assert not served(intruder)


def test_the_cli_presents_a_client_certificate(mtls_gateway, pki):
    from farm.cli.commands import app

    local, key = mtls_gateway
    cert, cert_key = pki.client_files(pki.ca, "cli")
    result = CliRunner().invoke(app, ["models", "list", "--target", local.target, "--api-key", key], env={
        "FARM_TLS_CA": str(pki.ca_file), "FARM_TLS_CERT": str(cert), "FARM_TLS_KEY": str(cert_key),
        "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "ltx" in result.output


# Rotation -----------------------------------------------------------------------------------


def presented_certificate(target: str, ca_file: Path) -> x509.Certificate:
    """The certificate the gateway presents to a new connection (a TLS handshake of our own)."""
    host, _, port = target.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=CALL_TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def replace(path: Path, data: bytes) -> None:
    """Writes `data` beside `path` and renames it into place, as secret mounts do."""
    temporary = path.with_suffix(path.suffix + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def test_a_rotated_certificate_is_served_to_new_connections(tmp_path, pki):
    cert_file, key_file = tmp_path / "gateway.crt", tmp_path / "gateway.key"
    cert_file.write_bytes(pki.server_cert.read_bytes())
    key_file.write_bytes(pki.server_key.read_bytes())
    config = farm_config(tmp_path / "farm", tls_cert_file=cert_file, tls_key_file=key_file)
    with serving(config) as local:
        key = key_of(config)
        assert presented_certificate(local.target, pki.ca_file).serial_number == pki.served.serial_number
        before = client(local.target, key, tls_ca_file=pki.ca_file)
        assert served(before)
        with client(local.target, key, tls_ca_file=pki.other_file) as trusts_new:
            assert not served(trusts_new), "the new CA's clients must not be served before the rotation"

        # A half-written rotation (the new certificate, the old key) is not taken: the
        # gateway keeps serving the certificate it has.
        new_cert, new_key, new = pki.other.issue("farm-gateway-renewed", server=True)
        replace(cert_file, new_cert)
        assert presented_certificate(local.target, pki.ca_file).serial_number == pki.served.serial_number
        with client(local.target, key, tls_ca_file=pki.ca_file) as meanwhile:
            assert served(meanwhile)

        replace(key_file, new_key)
        # The next handshake sees the change: no restart, no waiting.
        assert presented_certificate(local.target, pki.other_file).serial_number == new.serial_number
        with client(local.target, key, tls_ca_file=pki.other_file) as after:
            assert served(after)
        with client(local.target, key, tls_ca_file=pki.ca_file) as trusts_old:
            assert not served(trusts_old), "a new connection must get the new certificate"
        assert local.gateway.certificates.reloads == 1
        # The connection made before the rotation keeps working.
        assert served(before)
        before.close()


def test_the_demo_speaks_tls_to_a_tls_gateway(tls_gateway, pki, tmp_path):
    """`farm demo` built a plaintext client whatever the gateway spoke."""
    from farm.cli.demo import demo_client_options

    local, key = tls_gateway
    assert demo_client_options(farm_config(tmp_path)) == {}
    served_tls = farm_config(tmp_path, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    # On its own it trusts the gateway's certificate file (right for a self-signed one) ...
    assert demo_client_options(served_tls) == {"tls": True, "tls_ca_file": pki.server_cert}
    # ... and takes farm's --tls-* options where given, as the demo's client does here.
    given = {"tls": False, "tls_ca_file": pki.ca_file, "tls_cert_file": None, "tls_key_file": None,
             "tls_server_name": None}
    with client(local.target, key, **demo_client_options(served_tls, given)) as demo:
        assert served(demo)
    mutual = farm_config(tmp_path, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                         tls_client_ca_file=pki.ca_file)
    with pytest.raises(SystemExit, match="--tls-cert"):
        demo_client_options(mutual)
