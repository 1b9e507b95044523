"""Client authentication, sans-IO: who may connect, and as which user.

``Authenticator`` (the broker owns one) applies, at CONNECT: a verified TLS client
certificate (``tls_identity_as_username``: its common name is the user), the login plugin
(``auth_plugin``: ``authenticate(client_id, username, password, peer, cert)`` on a check
thread; True, False, None for "no opinion", or ``{"allow", "username"}``), the password
file (``password_file``) and ``allow_anonymous``; the ACL file (node/acl.py) it loads and
reloads with the password file. SCRAM (MQTT 5 enhanced authentication) is node/scram.py.

The password file: a line is ``username:hash``; blank lines and lines starting with ``#`` are skipped. The
hashes understood:

* ``$scrypt$<log2 N>$<r>$<p>$<salt>$<hash>``: what ``shoal passwd`` writes (scrypt,
  N = 2^13, r = 8, p = 1: 8 MiB and about 20 ms per check);
* ``$scram-sha-256$<iterations>$<salt>$<StoredKey>$<ServerKey>``: ``shoal passwd
  --scram`` (node/scram.py; plain passwords are checked against it too);
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

from .config import ConfigError, is_loopback

__all__ = ["Authenticator", "PasswordFile", "PasswordFileError", "Verdict", "cert_identity",
           "hash_password", "load_plugin", "parse_password_file",
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
        if hashed.startswith("$scram-sha-256$"):
            from .scram import parse_entry
            parse_entry(hashed)
            return None
        if hashed.startswith("$6$") and len(parts) == 4:
            _unb64(parts[2]), _unb64(parts[3])
            return None
    except (ValueError, binascii.Error):
        return "a number or a base64 part does not parse"
    return ("not a hash this server knows ($scrypt$, $scram-sha-256$, $7$ or $6$): a "
            "plain-text password?")


def verify_hash(hashed: str, password: bytes) -> bool:
    """Does ``password`` match ``hashed`` (a format ``_check_format`` accepts)?"""
    parts = hashed.split("$")
    if hashed.startswith("$scrypt$"):
        log_n, r, p = int(parts[2]), int(parts[3]), int(parts[4])
        want = _unb64(parts[6])
        got = hashlib.scrypt(password, salt=_unb64(parts[5]), n=1 << log_n, r=r, p=p,
                             maxmem=256 * 1024 * 1024, dklen=len(want))
    elif hashed.startswith("$scram-sha-256$"):
        from .scram import verify_scram_password
        return verify_scram_password(hashed, password)
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
#: the entry point group of ``auth_plugin`` names
PLUGIN_GROUP = "shoal.auth"


def cert_identity(cert: dict | None) -> str | None:
    """The subject's common name of a verified client certificate (``ssl``'s
    ``getpeercert()`` shape), or None."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return value
    return None


class Verdict:
    """A check's outcome: ``identity`` is the username the session gets (what the ACL
    and the ClientID binding use), ``refusal`` a ``(reason code, why)`` or None."""

    __slots__ = ("identity", "refusal")

    def __init__(self, identity: str | None, refusal: tuple | None = None) -> None:
        self.identity = identity
        self.refusal = refusal


def load_plugin(spec: str):
    """``auth_plugin``: ``module:attribute`` or the name of an entry point in the
    ``shoal.auth`` group. The object is a callable ``authenticate(client_id, username,
    password, peer, cert)`` or has such an ``authenticate`` method (and optionally
    ``reload()``)."""
    import importlib
    from importlib.metadata import entry_points
    try:
        if ":" in spec:
            module, _, attr = spec.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        else:
            found = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == spec]
            if not found:
                raise ConfigError(f"auth_plugin {spec!r}: no entry point of that name in the "
                                  f"{PLUGIN_GROUP!r} group (installed?); or give "
                                  "`module:function`")
            obj = found[0].load()
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any import error of a user's plugin
        raise ConfigError(f"auth_plugin {spec!r} cannot be loaded: {err!r}") from None
    if callable(getattr(obj, "authenticate", None)):
        return obj
    if callable(obj):
        return _FunctionPlugin(obj)
    raise ConfigError(f"auth_plugin {spec!r} is neither callable nor has `authenticate`")


class _FunctionPlugin:
    __slots__ = ("authenticate",)

    def __init__(self, fn) -> None:
        self.authenticate = fn


class Authenticator:
    """Who may connect (``password_file``, ``auth_plugin``, ``allow_anonymous``,
    ``tls_identity_as_username``) and what they may do (``acl_file``); the broker owns
    one."""

    def __init__(self, config) -> None:
        from .acl import load_acl_file
        self.config = config
        self.passwords = PasswordFile(config.password_file) if config.password_file else None
        if self.passwords is not None:
            self.passwords.load()
        self.plugin = load_plugin(config.auth_plugin) if config.auth_plugin else None
        self.acl = load_acl_file(config.acl_file) if config.acl_file else None
        mode = config.allow_anonymous
        self.anonymous = mode == "true" or (
            mode == "auto" and self.passwords is None and self.plugin is None
            and is_loopback(config.host))
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

    def reload(self) -> dict:
        """Read the password file and the ACL file again, both or neither (ConfigError:
        what was loaded before stays); the plugin's ``reload()`` too. Returns what is
        loaded now: ``{"users": n or None, "acl_rules": n or None}``."""
        from .acl import load_acl_file
        acl = None
        if self.config.acl_file:
            acl = load_acl_file(self.config.acl_file)
        users = self.passwords.load() if self.passwords is not None else None
        if acl is not None:
            self.acl = acl
        reload = getattr(self.plugin, "reload", None)
        if callable(reload):
            reload()
        return {"users": users, "acl_rules": acl.rule_count() if acl is not None else None}

    def decide(self, username: str | None, password: bytes | None):
        """ACCEPT, CHECK (run ``check_later``), or a refusal: ``(reason code, why)``."""
        from .mqtt.codes import ReasonCode
        if self.plugin is not None:
            if self.pending >= MAX_PENDING_CHECKS:
                self.refused += 1
                return (ReasonCode.SERVER_BUSY, "too many logins waiting: try again")
            return CHECK  # (the plugin may block: it runs on the check threads)
        return self._decide_local(username, password)

    def _decide_local(self, username: str | None, password: bytes | None):
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

    def check_later(self, loop, client_id: str, username: str | None,
                    password: bytes | None, peer: str, cert):
        """``decide``'s CHECK on this authenticator's threads: a future of a Verdict."""
        self.pending += 1
        fut = loop.run_in_executor(self.executor, self._check, client_id, username, password,
                                   peer, cert)
        fut.add_done_callback(self._checked)
        return fut

    def _checked(self, _fut) -> None:
        self.pending -= 1

    def _check(self, client_id: str, username: str | None, password: bytes | None,
               peer: str, cert) -> Verdict:
        from .mqtt.codes import ReasonCode
        if self.plugin is not None:
            answer = self.plugin.authenticate(client_id, username, password, peer, cert)
            verdict = _plugin_verdict(answer, username)
            if verdict is not None:
                return verdict
            local = self._decide_local(username, password)  # the plugin had no opinion
            if local is ACCEPT:
                return Verdict(username)
            if local is not CHECK:
                return Verdict(None, local)
        if self.passwords is not None and username is not None and \
                self.passwords.check(username, password or b""):
            return Verdict(username)
        return Verdict(None, (ReasonCode.BAD_USER_NAME_OR_PASSWORD, "bad username or password"))


def _plugin_verdict(answer, username: str | None) -> Verdict | None:
    """A plugin's answer: True / False / None (no opinion: the password file and
    ``allow_anonymous`` decide) or ``{"allow": bool, "username": str, "reason": str}``."""
    from .mqtt.codes import ReasonCode
    if answer is None:
        return None
    if isinstance(answer, bool):
        allow, identity, why = answer, username, "refused by the auth plugin"
    elif isinstance(answer, dict) and isinstance(answer.get("allow"), bool):
        allow = answer["allow"]
        identity = answer.get("username", username)
        why = str(answer.get("reason") or "refused by the auth plugin")
        if identity is not None and not isinstance(identity, str):
            raise TypeError(f"auth plugin gave username {identity!r}: a str or None")
    else:
        raise TypeError(f"auth plugin answered {answer!r}: True, False, None or a dict "
                        "with `allow`")
    if allow:
        return Verdict(identity)
    return Verdict(None, (ReasonCode.BAD_USER_NAME_OR_PASSWORD if username is not None
                          else ReasonCode.NOT_AUTHORIZED, why))
