"""Client authentication by password file (``password_file``), sans-IO.

A line is ``username:hash``; blank lines and lines starting with ``#`` are skipped. The
hashes understood:

* ``$scrypt$<log2 N>$<r>$<p>$<salt>$<hash>``: what ``shoal passwd`` writes (scrypt,
  N = 2^13, r = 8, p = 1: 8 MiB and about 20 ms per check);
* ``$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-SHA512, what ``mosquitto_passwd`` 2.x
  writes;
* ``$6$<salt>$<hash>``: SHA-512 of the password and the salt, ``mosquitto_passwd`` 1.x;

salt and hash in standard base64. A file of Mosquitto's therefore works as it is, and
``shoal passwd`` keeps its other lines untouched.

``PasswordFile.check`` is CPU work (by design): the server runs it off the event loop
(node/server.py), and remembers a successful check (a keyed digest of the pair, never the
password) so that a client reconnecting does not pay it again until the file changes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets

from .config import ConfigError

__all__ = ["PasswordFile", "PasswordFileError", "hash_password", "parse_password_file",
           "verify_hash", "write_entry"]

SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 13, 8, 1
SALT_BYTES = 16
MAX_PBKDF2_ITERATIONS = 10_000_000  # (a file cannot make one check run for minutes)


class PasswordFileError(ConfigError):
    """A password file that cannot be used: the message names the line and what to fix."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The ``$scrypt$`` hash of ``password`` (a new random salt unless given)."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << SCRYPT_LOG_N,
                            r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024 * 1024, dklen=32)
    return f"$scrypt${SCRYPT_LOG_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _check_format(hashed: str) -> str | None:
    """None when ``hashed`` is a hash this module can verify, else what is wrong."""
    parts = hashed.split("$")
    try:
        if hashed.startswith("$scrypt$") and len(parts) == 7:
            log_n, r, p = int(parts[2]), int(parts[3]), int(parts[4])
            if not (1 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
                return "scrypt parameters out of range"
            _unb64(parts[5]), _unb64(parts[6])
            return None
        if hashed.startswith("$7$") and len(parts) == 5:
            if not 1 <= int(parts[2]) <= MAX_PBKDF2_ITERATIONS:
                return "PBKDF2 iterations out of range"
            _unb64(parts[3]), _unb64(parts[4])
            return None
        if hashed.startswith("$6$") and len(parts) == 4:
            _unb64(parts[2]), _unb64(parts[3])
            return None
    except (ValueError, binascii.Error):
        return "a number or a base64 part does not parse"
    return "not a hash this server knows ($scrypt$, $7$ or $6$): a plain-text password?"


def verify_hash(hashed: str, password: bytes) -> bool:
    """Does ``password`` match ``hashed`` (a format ``_check_format`` accepts)?"""
    parts = hashed.split("$")
    if hashed.startswith("$scrypt$"):
        log_n, r, p = int(parts[2]), int(parts[3]), int(parts[4])
        want = _unb64(parts[6])
        got = hashlib.scrypt(password, salt=_unb64(parts[5]), n=1 << log_n, r=r, p=p,
                             maxmem=256 * 1024 * 1024, dklen=len(want))
    elif hashed.startswith("$7$"):
        want = _unb64(parts[4])
        got = hashlib.pbkdf2_hmac("sha512", password, _unb64(parts[3]), int(parts[2]),
                                  dklen=len(want))
    else:  # $6$
        want = _unb64(parts[3])
        got = hashlib.sha512(password + _unb64(parts[2])).digest()
    return hmac.compare_digest(got, want)


def parse_password_file(text: str, path: str = "password file") -> dict[str, str]:
    """``{username: hash}``; PasswordFileError names the first bad line."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise PasswordFileError(f"{path} line {number}: expected `username:hash`")
        problem = _check_format(hashed)
        if problem:
            raise PasswordFileError(f"{path} line {number} (user {user!r}): {problem}; "
                                    "write it with `shoal passwd` or mosquitto_passwd")
        users[user] = hashed
    return users


def write_entry(text: str, user: str, hashed: str | None) -> str:
    """The file ``text`` with ``user``'s line set to ``hashed`` (None: removed); the other
    lines (comments included) stay as they are."""
    if ":" in user or not user or user != user.strip() or "\n" in user:
        raise PasswordFileError(f"username {user!r}: no colon, no line break, no leading or "
                                "trailing space")
    out, done = [], False
    for line in text.splitlines():
        if line.strip().partition(":")[0] == user and not line.lstrip().startswith("#"):
            if hashed is not None and not done:
                out.append(f"{user}:{hashed}")
            done = True
            continue
        out.append(line)
    if hashed is not None and not done:
        out.append(f"{user}:{hashed}")
    return "\n".join(out) + ("\n" if out else "")


class PasswordFile:
    """The users of ``path``, read with ``load`` (at start and at each reload)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.users: dict[str, str] = {}
        self.generation = 0
        self._key = secrets.token_bytes(32)  # (the cache's digests mean nothing elsewhere)
        self._ok: set[bytes] = set()

    def load(self) -> int:
        """Read the file (PasswordFileError when it cannot be used: the users loaded
        before stay); returns how many users it has."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as err:
            raise PasswordFileError(f"password_file {self.path} cannot be read "
                                    f"({err.strerror}): check the path and its "
                                    "permissions") from None
        users = parse_password_file(text, self.path)
        self.users = users
        self.generation += 1
        self._ok.clear()
        return len(users)

    def _digest(self, user: str, password: bytes) -> bytes:
        return hmac.new(self._key, user.encode() + b"\0" + password, "sha256").digest()

    def known_good(self, user: str, password: bytes) -> bool:
        """Checked before with this file's contents (no hashing needed)?"""
        return self._digest(user, password) in self._ok

    def check(self, user: str, password: bytes) -> bool:
        """The slow check (run it off the event loop). An unknown user costs a check too,
        so that timing does not tell which users exist."""
        generation, hashed = self.generation, self.users.get(user)
        ok = verify_hash(hashed if hashed is not None else _dummy(), password)
        if not ok or hashed is None:
            return False
        if generation == self.generation:  # (not from a file reloaded meanwhile)
            if len(self._ok) > 100_000:
                self._ok.clear()
            self._ok.add(self._digest(user, password))
        return True


_DUMMY: list[str] = []


def _dummy() -> str:
    if not _DUMMY:
        _DUMMY.append(hash_password(os.urandom(8).hex()))
    return _DUMMY[0]


# -- the policy a node applies at CONNECT ----------------------------------------------------

#: the answer of ``Authenticator.decide``: accepted, or a slow check to run first
ACCEPT, CHECK = "accept", "check"
#: password checks running or waiting at once, at most (past it: CONNACK 0x89 server busy)
MAX_PENDING_CHECKS = 256
CHECK_THREADS = 2


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Who may connect (``password_file``, ``allow_anonymous``); the broker owns one."""

    def __init__(self, config) -> None:
        self.passwords = PasswordFile(config.password_file) if config.password_file else None
        if self.passwords is not None:
            self.passwords.load()
        mode = config.allow_anonymous
        self.anonymous = mode == "true" or (
            mode == "auto" and self.passwords is None and is_loopback(config.host))
        self.pending = 0
        self.refused = 0
        self._executor = None

    @property
    def executor(self):
        """Two threads of password checks, apart from the store's (a burst of logins
        never delays a commit)."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor
            self._executor = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="shoal-auth")
        return self._executor

    def reload(self) -> int | None:
        """Read the password file again (PasswordFileError: the old users stay)."""
        return self.passwords.load() if self.passwords is not None else None

    def decide(self, username: str | None, password: bytes | None):
        """ACCEPT, CHECK (run ``check`` off the loop, then ``accepted``), or a refusal:
        ``(reason code, why)``."""
        from .mqtt.codes import ReasonCode
        if username is None:
            if self.anonymous:
                return ACCEPT
            self.refused += 1
            return (ReasonCode.NOT_AUTHORIZED, "anonymous clients are not allowed here: give "
                    "a username and password (or set allow_anonymous)")
        if self.passwords is None:
            if self.anonymous:
                return ACCEPT  # (no users configured: a username is only a name)
            self.refused += 1
            return (ReasonCode.NOT_AUTHORIZED, "no password_file and anonymous clients are "
                    "not allowed: nobody can connect (set password_file)")
        if password is not None and self.passwords.known_good(username, password):
            return ACCEPT
        if self.pending >= MAX_PENDING_CHECKS:
            self.refused += 1
            return (ReasonCode.SERVER_BUSY, "too many password checks waiting: try again")
        return CHECK

    def check_later(self, loop, username: str, password: bytes | None):
        """``decide``'s CHECK on this authenticator's threads: a future of the verdict."""
        self.pending += 1
        fut = loop.run_in_executor(self.executor, self._check, username, password)
        fut.add_done_callback(self._checked)
        return fut

    def _checked(self, _fut) -> None:
        self.pending -= 1

    def _check(self, username: str, password: bytes | None) -> bool:
        return self.passwords is not None and self.passwords.check(username, password or b"")
