"""TLS and mutual TLS with certificates made here: who gets through, and clear errors for bad files."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import AD_IMPRESSIONS, rows_request, source_from_json, start
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from featurepush import Client, FeatureStatus, UnavailableError
from featurepush.aio import AsyncClient
from featurepush.v1 import ingest_service_pb2_grpc, registry_service_pb2, registry_service_pb2_grpc
from featurepush_server.cli import main
from featurepush_server.config import ConfigError
from featurepush_server.core.keys import add_key

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


@dataclass
class Authority:
    """A CA that signs certificates into a folder."""

    folder: Path
    name: str

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(self.name))
            .issuer_name(_name(self.name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.folder / f"{self.name}.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        """A leaf certificate and its key: for localhost and 127.0.0.1 if `server`, else for a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = self.folder / f"{name}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, _write_key(self.folder / f"{name}.key", key)


@dataclass
class Pki:
    """A CA with a server and a client certificate, and a rogue CA with a client certificate of its own."""

    ca: Authority
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    rogue: Authority
    rogue_client: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "featurepush-test-ca")
    rogue = Authority(folder, "rogue-ca")
    return Pki(
        ca,
        ca.issue("server", server=True),
        ca.issue("client", server=False),
        rogue,
        rogue.issue("rogue-client", server=False),
    )


def record(i: int) -> dict[str, object]:
    return {"user_id": f"u{i}", "timestamp": T0, "clicked": i}


@pytest.fixture
def tls_server(pki: Pki, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A TLS server requiring keys; yields its target and an admin key."""
    keys_file = tmp_path / "keys.json"
    _, key = add_key(keys_file, ["admin"])
    r = start(tmp_path / "data", tls_cert=pki.server[0], tls_key=pki.server[1], keys_file=keys_file)
    try:
        with Client(r.target, ca_cert=pki.ca.cert_path, api_key=key) as client:
            request = registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS))
            registry_service_pb2_grpc.RegistryServiceStub(client.channel).ApplySource(request)
        yield r.target, key
    finally:
        r.close()


@pytest.fixture
def mtls_server(pki: Pki, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A mutual-TLS server requiring keys; yields its target and an admin key."""
    keys_file = tmp_path / "keys.json"
    _, key = add_key(keys_file, ["admin"])
    r = start(
        tmp_path / "data",
        tls_cert=pki.server[0],
        tls_key=pki.server[1],
        tls_client_ca=pki.ca.cert_path,
        keys_file=keys_file,
    )
    try:
        yield r.target, key
    finally:
        r.close()


def test_tls_client_with_a_key_pushes_and_reads(tls_server: tuple[str, str], pki: Pki) -> None:
    target, key = tls_server
    with Client(target, ca_cert=pki.ca.cert_path, api_key=key, timeout=5) as client:
        client.push("ad_impressions", [record(1)])
        assert client.get_features("ad_impressions", ["u1"])[0].status == FeatureStatus.PRESENT
        with client.pusher("ad_impressions") as pusher:
            pusher.add(record(2))
        assert pusher.stats.written == 1


@pytest.mark.parametrize("how", ["plaintext", "untrusted server certificate"])
def test_tls_refuses_clients_that_cannot_verify_it(tls_server: tuple[str, str], pki: Pki, how: str) -> None:
    target, key = tls_server
    options = {} if how == "plaintext" else {"ca_cert": pki.rogue.cert_path}
    with Client(target, api_key=key, timeout=5, **options) as client:  # type: ignore[arg-type]
        with pytest.raises(UnavailableError):
            list(client.list_sources())


def test_mtls_admits_only_clients_with_a_certificate_from_its_ca(
    mtls_server: tuple[str, str], pki: Pki
) -> None:
    target, key = mtls_server
    with Client(
        target, ca_cert=pki.ca.cert_path, client_cert=pki.client[0], client_key=pki.client[1], api_key=key
    ) as client:
        assert list(client.list_sources()) == []
    for cert, cert_key in (None, None), pki.rogue_client:
        with Client(
            target, ca_cert=pki.ca.cert_path, client_cert=cert, client_key=cert_key, api_key=key, timeout=5
        ) as client:
            with pytest.raises(UnavailableError):
                list(client.list_sources())


def test_a_raw_channel_without_a_client_certificate_is_refused(
    mtls_server: tuple[str, str], pki: Pki
) -> None:
    target, key = mtls_server
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_path.read_bytes())
    with grpc.secure_channel(target, credentials) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            ingest_service_pb2_grpc.IngestServiceStub(channel).Push(
                rows_request({"ad_impressions": []}), metadata=[("authorization", f"Bearer {key}")], timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_async_client_over_mtls(mtls_server: tuple[str, str], pki: Pki) -> None:
    target, key = mtls_server

    async def scenario() -> None:
        async with AsyncClient(
            target, ca_cert=pki.ca.cert_path, client_cert=pki.client[0], client_key=pki.client[1], api_key=key
        ) as client:
            with pytest.raises(Exception, match="NOT_FOUND"):
                await client.get_features("nothing", ["x"])

    asyncio.run(scenario())


def test_cli_over_mtls_with_a_key_from_the_environment(
    mtls_server: tuple[str, str],
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, key = mtls_server
    monkeypatch.setenv("FEATUREPUSH_API_KEY", key)
    monkeypatch.setenv("FEATUREPUSH_CA_CERT", str(pki.ca.cert_path))
    argv = ["sources", "--target", target, "--client-cert", str(pki.client[0])]
    assert main([*argv, "--client-key", str(pki.client[1])]) == 0
    monkeypatch.delenv("FEATUREPUSH_API_KEY")
    assert main([*argv, "--client-key", str(pki.client[1])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "UNAUTHENTICATED" in err and key not in err


def test_bad_client_files_are_one_clear_line(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pem"
    assert main(["sources", "--ca-cert", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"ca_cert: cannot read {missing}" in err
    assert main(["sources", "--ca-cert", str(pki.client[1])]) == 1
    assert "is not a PEM file with a certificate" in capsys.readouterr().err
    with pytest.raises(ValueError, match="client_cert and client_key go together"):
        Client("localhost:1", client_cert=pki.client[0])


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"tls_cert": "missing"}, "tls_cert and tls_key must be set together"),
        ({"tls_client_ca": "ca"}, r"tls_client_ca \(mutual TLS\) needs tls_cert"),
        ({"tls_cert": "missing", "tls_key": "key"}, "tls_cert: cannot read .*missing.pem: No such file"),
        ({"tls_cert": "key", "tls_key": "key"}, "tls_cert: .* holds no PEM certificate"),
        ({"tls_cert": "cert", "tls_key": "cert"}, "tls_key: .* holds no PEM private key"),
        ({"tls_cert": "cert", "tls_key": "key", "tls_client_ca": "missing"}, "tls_client_ca: cannot read"),
    ],
)
def test_bad_server_files_stop_the_start(pki: Pki, tmp_path: Path, files: dict[str, str], match: str) -> None:
    paths = {"cert": pki.server[0], "key": pki.server[1], "ca": pki.ca.cert_path}
    paths["missing"] = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=match):
        start(tmp_path / "data", **{name: paths[which] for name, which in files.items()})


def test_serve_with_a_missing_certificate_says_so_in_one_line(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--listen", "localhost:0", "--data-dir", str(tmp_path / "d")]
    assert main([*argv, "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pki.server[1])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tls_cert: cannot read" in err
