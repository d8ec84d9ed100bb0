"""Server TLS and mutual TLS credentials from the PEM files the configuration names."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from .config import ConfigError, ServerConfig

_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----")
_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:RSA |EC )?PRIVATE KEY-----")


def read_pem(setting: str, path: Path, *, private_key: bool = False) -> bytes:
    """The bytes of a PEM file; raises ConfigError naming the setting if it is unreadable or not PEM."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror or e}") from None
    if private_key:
        if b"ENCRYPTED PRIVATE KEY" in data or b"Proc-Type: 4,ENCRYPTED" in data:
            raise ConfigError(f"{setting}: {path} is an encrypted private key; gRPC needs it unencrypted")
        if not _PRIVATE_KEY.search(data):
            raise ConfigError(f"{setting}: {path} holds no PEM private key")
    elif not _CERTIFICATE.search(data):
        raise ConfigError(f"{setting}: {path} holds no PEM certificate")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials if tls_cert is set (client certificates required if tls_client_ca is), else None."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    chain = read_pem("tls_cert", config.tls_cert)
    key = read_pem("tls_key", config.tls_key, private_key=True)
    client_ca = read_pem("tls_client_ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
