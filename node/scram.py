"""SCRAM-SHA-256 (RFC 5802, RFC 7677), the server side, sans-IO: MQTT 5 enhanced
authentication (``enhanced_auth = "SCRAM-SHA-256"``).

The exchange, in the CONNECT / AUTH / CONNACK packets' Authentication Data::

    CONNECT  (method SCRAM-SHA-256)  client-first:  n,,n=<user>,r=<client nonce>
    AUTH 0x18 (continue)             server-first:  r=<nonce>,s=<salt>,i=<iterations>
    AUTH 0x18 (continue)             client-final:  c=biws,r=<nonce>,p=<proof>
    CONNACK 0x00                     server-final:  v=<server signature>

The server never sees the password: a user's entry in the password file holds the salt,
the iteration count, ``StoredKey`` and ``ServerKey`` (``shoal passwd --scram`` writes
``$scram-sha-256$<iterations>$<salt>$<StoredKey>$<ServerKey>``, base64). The same entry
checks a plain CONNECT password too (the salted password is derived and compared), so a
user can log in either way. An unknown user gets a made-up salt (the same one each time:
derived from the user name and a per-process key) and fails at the proof, as a wrong
password does, so that the exchange does not tell which users exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["METHOD", "ScramError", "ScramServer", "scram_entry", "verify_scram_password"]

METHOD = "SCRAM-SHA-256"
ITERATIONS = 10_000  # what `shoal passwd --scram` writes (RFC 7677: at least 4096)
MIN_ITERATIONS, MAX_ITERATIONS = 4096, 10_000_000
_FAKE_KEY = secrets.token_bytes(32)


class ScramError(Exception):
    """A malformed message of the client (the exchange ends: CONNACK 0x86 / bad auth)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey)."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return client_key, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")


def scram_entry(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The password file hash of ``password`` for SCRAM-SHA-256."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    _, stored, server = _keys(password.encode("utf-8"), salt, iterations)
    return f"$scram-sha-256${iterations}${_b64(salt)}${_b64(stored)}${_b64(server)}"


def parse_entry(hashed: str) -> tuple[int, bytes, bytes, bytes]:
    """(iterations, salt, StoredKey, ServerKey) of a ``$scram-sha-256$`` entry (ValueError
    when it is not one)."""
    parts = hashed.split("$")
    if len(parts) != 6 or parts[1] != "scram-sha-256":
        raise ValueError("not a $scram-sha-256$ entry")
    iterations = int(parts[2])
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError("SCRAM iterations out of range")
    salt, stored, server = (base64.b64decode(p.encode("ascii"), validate=True)
                            for p in parts[3:])
    if len(stored) != 32 or len(server) != 32:
        raise ValueError("SCRAM keys must be 32 bytes")
    return iterations, salt, stored, server


def verify_scram_password(hashed: str, password: bytes) -> bool:
    """A plain password against a ``$scram-sha-256$`` entry."""
    iterations, salt, stored, _ = parse_entry(hashed)
    _, got, _ = _keys(password, salt, iterations)
    return hmac.compare_digest(got, stored)


def _attrs(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed attribute {part[:20]!r}")
        out.setdefault(part[0], part[2:])
    return out


def _unescape(name: str) -> str:
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise ScramError("bad escape in the user name")
    return name.replace("=2C", ",").replace("=3D", "=")


class ScramServer:
    """One exchange. ``first(client_first, entry_of)`` -> server-first (``entry_of(user)``
    gives the user's ``$scram-sha-256$`` entry or None); ``final(client_final)`` -> the
    server-final message, or None when the proof is wrong."""

    __slots__ = ("user", "_bare", "_server_first", "_nonce", "_entry", "_gs2")

    def __init__(self) -> None:
        self.user: str | None = None
        self._bare = self._server_first = self._nonce = self._gs2 = ""
        self._entry: tuple | None = None

    def first(self, data: bytes, entry_of) -> bytes:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("client-first is not UTF-8") from None
        if not (text.startswith("n,") or text.startswith("y,")):
            raise ScramError("channel binding is not supported (gs2 header n or y)")
        cbind, _, rest = text.partition(",")
        authzid, _, bare = rest.partition(",")
        if authzid:
            raise ScramError("an authorization identity is not supported")
        self._gs2 = f"{cbind},,"
        attrs = _attrs(bare)
        if "n" not in attrs or "r" not in attrs or not attrs["r"] or "m" in attrs:
            raise ScramError("client-first needs n= and r=")
        self.user = _unescape(attrs["n"])
        self._bare = bare
        self._nonce = attrs["r"] + _b64(secrets.token_bytes(18))
        entry = entry_of(self.user)
        try:
            self._entry = parse_entry(entry) if entry is not None else None
        except ValueError:
            self._entry = None  # (a user without a SCRAM entry fails like a wrong password)
        if self._entry is not None:
            iterations, salt = self._entry[0], self._entry[1]
        else:
            iterations, salt = ITERATIONS, _hmac(_FAKE_KEY, self.user.encode())[:16]
        self._server_first = f"r={self._nonce},s={_b64(salt)},i={iterations}"
        return self._server_first.encode()

    def final(self, data: bytes) -> bytes | None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("client-final is not UTF-8") from None
        without_proof, sep, proof_attr = text.rpartition(",p=")
        if not sep:
            raise ScramError("client-final has no proof")
        attrs = _attrs(without_proof)
        if attrs.get("r") != self._nonce:
            raise ScramError("the nonce of client-final does not match")
        if attrs.get("c") != _b64(self._gs2.encode()):
            raise ScramError("the channel binding of client-final does not match")
        try:
            proof = base64.b64decode(proof_attr.encode("ascii"), validate=True)
        except ValueError:
            raise ScramError("the proof is not base64") from None
        if self._entry is None or len(proof) != 32:
            return None
        _, _, stored, server_key = self._entry
        auth_message = f"{self._bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(stored, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored):
            return None
        return f"v={_b64(_hmac(server_key, auth_message))}".encode()


def client_exchange(user: str, password: str, nonce: str | None = None):
    """The client side (tests and examples): a generator that yields client-first, is sent
    server-first and yields client-final, is sent server-final and returns whether the
    server proved itself."""
    nonce = nonce or _b64(secrets.token_bytes(18))
    name = user.replace("=", "=3D").replace(",", "=2C")
    bare = f"n={name},r={nonce}"
    server_first = (yield f"n,,{bare}".encode()).decode()
    attrs = _attrs(server_first)
    if not attrs["r"].startswith(nonce):
        raise ScramError("the server's nonce does not extend ours")
    salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
    client_key, stored, server_key = _keys(password.encode(), salt, iterations)
    without_proof = f"c={_b64(b'n,,')},r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    proof = bytes(a ^ b for a, b in zip(client_key, _hmac(stored, auth_message)))
    server_final = (yield f"{without_proof},p={_b64(proof)}".encode()).decode()
    return hmac.compare_digest(server_final, f"v={_b64(_hmac(server_key, auth_message))}")
