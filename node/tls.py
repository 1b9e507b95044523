"""TLS for the client listeners: one server ``ssl.SSLContext`` per node, built once at start.

``tls_port`` serves MQTT over TLS with the very same ``MqttProtocol`` as the TCP listener
(``loop.create_server(..., ssl=context)``: the event loop's TLS layer sits under the
protocol, so nothing of MQTT knows about TLS); ``wss_port`` serves the WebSocket listener
(node/websocket.py) with the same context.

A missing, unreadable or unusable file stops the node before anything listens, with one
line naming the option and the file (a ``ConfigError``: exit code 2, like a bad option).
A client whose handshake fails (no common protocol, a plain-TCP client, a client that does
not trust us, a missing client certificate) only loses its own connection: the event loop
closes it before any ``MqttProtocol`` exists for it.
"""

from __future__ import annotations

import ssl

from .config import Config, ConfigError

__all__ = ["server_ssl_context"]


MAX_PEM_BYTES = 1 << 20  # a certificate chain or key file is a few KB


def _read(option: str, path: str, must_hold: bytes, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PEM_BYTES)
    except OSError as err:
        raise ConfigError(f"{option} = {path!r}: cannot read the file: "
                          f"{err.strerror or err}") from None
    if must_hold not in data:
        raise ConfigError(f"{option} = {path!r}: no {what} in the file (PEM expected)")
    return data


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server context for ``tls_port`` and ``wss_port``, or None when both are 0.

    TLS 1.2 or newer, the ssl module's default (secure) cipher list, no compression, no
    renegotiation. With ``tls_ca`` client certificates are verified against it (required
    with ``tls_require_client_cert``, else only checked when a client offers one)."""
    if not (config.tls_port or config.wss_port):
        return None
    _read("tls_cert", config.tls_cert, b"-----BEGIN CERTIFICATE-----", "certificate")
    key = _read("tls_key", config.tls_key, b"PRIVATE KEY-----", "private key")
    if b"ENCRYPTED" in key:
        raise ConfigError(f"tls_key = {config.tls_key!r}: the key is encrypted; give an "
                          "unencrypted key (e.g. `openssl pkey -in KEY -out KEY.plain`)")
    if config.tls_ca:
        _read("tls_ca", config.tls_ca, b"-----BEGIN CERTIFICATE-----", "CA certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        # an encrypted key fails here instead of asking for a pass phrase on the terminal
        ctx.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    except ssl.SSLError as err:
        problem = ("the key does not belong to the certificate"
                   if err.reason == "KEY_VALUES_MISMATCH" else f"not usable: {err}")
        raise ConfigError(f"tls_key = {config.tls_key!r} / tls_cert = {config.tls_cert!r}: "
                          f"{problem}") from None
    if config.tls_ca:
        try:
            ctx.load_verify_locations(cafile=config.tls_ca)
        except ssl.SSLError as err:
            raise ConfigError(f"tls_ca = {config.tls_ca!r}: no usable PEM CA certificate in "
                              f"the file ({err.reason or err})") from None
        ctx.verify_mode = (ssl.CERT_REQUIRED if config.tls_require_client_cert
                           else ssl.CERT_OPTIONAL)
    return ctx
