"""Shoal's configuration: one frozen dataclass, every option documented in place.

Precedence, lowest first: the defaults below < a TOML file (``--config FILE`` or
``SHOAL_CONFIG``; flat top-level keys named like the fields) < ``SHOAL_<FIELD>``
environment variables < command-line flags.  :func:`load_config` applies it and
validates the result; :func:`options_markdown` renders the README's option table
from the same metadata that the CLI uses for its ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import socket
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Config",
    "ConfigError",
    "ENV_PREFIX",
    "env_var",
    "flag",
    "load_config",
    "options_markdown",
    "parse_value",
]

ENV_PREFIX = "SHOAL_"
CONFIG_FILE_ENV = ENV_PREFIX + "CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message says what to do."""


# --- validators: each returns None when the value is fine, else what a valid value is ---

def _int_range(low: int, high: int | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value < low or (high is not None and value > high):
            return f"use an integer from {low} to {high}" if high is not None else f"use an integer >= {low}"
        return None
    return check


def _non_negative_number(value: Any) -> str | None:
    if not math.isfinite(value) or value < 0:
        return "use a number of seconds >= 0"
    return None


def _positive_number(value: Any) -> str | None:
    if not math.isfinite(value) or value <= 0:
        return "use a number of seconds > 0"
    return None


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else "use one of " + ", ".join(choices)
    return check


#: secrets of examples and tutorials, refused whatever their length
PLACEHOLDER_SECRETS = frozenset({"change-me", "changeme", "change_me", "secret", "password",
                                 "s", "shoal", "test", "example"})


def _secret(value: Any) -> str | None:
    if not value:
        return None  # (required with cluster_port: the cluster says so)
    if value.strip().lower() in PLACEHOLDER_SECRETS:
        return "that is an example's placeholder: make one with `openssl rand -hex 24`"
    if len(value) < 16:
        return "use at least 16 characters (`openssl rand -hex 24` makes one)"
    return None


def _node_id(value: Any) -> str | None:
    if len(value) > 128 or any(c.isspace() or c == "=" for c in value):
        return "use at most 128 characters without spaces or '='"
    return None


def _url_path(value: Any) -> str | None:
    if not value.startswith("/") or any(c.isspace() or c in "?#" for c in value):
        return "use an absolute URL path such as /mqtt (no spaces, query or fragment)"
    return None


def _networks(value: Any) -> str | None:
    try:
        parse_networks(value)
    except ValueError as err:
        return f"use comma-separated addresses or networks such as 10.0.0.0/8 ({err})"
    return None


def parse_networks(value: str) -> tuple:
    """``"10.0.0.0/8, 127.0.0.1"`` -> ip_network objects; ``""`` -> ()."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in value.split(",") if part.strip())


def _opt(default: Any, help: str, check: Callable[[Any], str | None] | None = None,
         shown_default: str | None = None) -> Any:
    """A Config field: its default, its one-line meaning, and its validator."""
    return field(default=default,
                 metadata={"help": help, "check": check, "shown_default": shown_default})


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a Shoal node can be told. Build it with :func:`load_config`."""

    node_id: str = _opt(
        "", "This node's name in logs and in the cluster; empty means `<hostname>-<mqtt_port>`.",
        _node_id, shown_default="`<hostname>-<mqtt_port>`")
    host: str = _opt("127.0.0.1", "Address the MQTT listeners (TCP, TLS, WebSocket) bind to "
                     "(`0.0.0.0` for all interfaces).")
    mqtt_port: int = _opt(1883, "MQTT TCP port (plaintext); 0 = off (a TLS-only node: set "
                          "`tls_port`).", _int_range(0, 65535))
    # -- more listeners: WebSocket and TLS (node/websocket.py, node/tls.py) ---------------
    ws_port: int = _opt(0, "MQTT over WebSocket port (subprotocol `mqtt`, path `ws_path`); "
                        "0 = off.", _int_range(0, 65535))
    ws_path: str = _opt("/mqtt", "HTTP path of the WebSocket listeners (`ws_port`, `wss_port`).",
                        _url_path)
    tls_port: int = _opt(0, "MQTT over TLS port (usually 8883); 0 = off. Needs `tls_cert` and "
                         "`tls_key`.", _int_range(0, 65535))
    wss_port: int = _opt(0, "MQTT over WebSocket over TLS port; 0 = off. Needs `tls_cert` and "
                         "`tls_key`.", _int_range(0, 65535))
    tls_cert: str = _opt("", "PEM file with the server certificate (and its intermediates) for "
                         "`tls_port` and `wss_port`.")
    tls_key: str = _opt("", "PEM file with the private key of `tls_cert` (unencrypted).")
    tls_ca: str = _opt("", "PEM file of CA certificates that client certificates are checked "
                       "against; empty: client certificates are not asked for.")
    tls_require_client_cert: bool = _opt(
        False, "With `tls_ca`: refuse TLS clients without a valid certificate (else one is "
        "checked only when offered).")
    # -- who may connect (node/auth.py) ------------------------------------------------------
    password_file: str = _opt(
        "", "File of `username:hash` lines (`shoal passwd` writes it; files of "
        "mosquitto_passwd work too): clients must give a listed username and its password "
        "(else CONNACK 0x86 / 4). Reread on SIGHUP.")
    allow_anonymous: str = _opt(
        "auto", "Clients without a username: `auto` accepts them only while `host` is a "
        "loopback address and no `password_file` is set (else CONNACK 0x87 / 5); `true` "
        "always; `false` never.", _one_of("auto", "true", "false"))
    auth_plugin: str = _opt(
        "", "A Python login check: `module:function` or the name of an entry point in the "
        "`shoal.auth` group, called as `authenticate(client_id, username, password, peer, "
        "cert)` on a worker thread; it answers True, False (CONNACK 0x86 / 4), None (no "
        "opinion: `password_file` and `allow_anonymous` decide) or `{\"allow\": bool, "
        "\"username\": identity}`. See README \"Security\".")
    enhanced_auth: str = _opt(
        "", "MQTT 5 enhanced authentication method offered: `SCRAM-SHA-256` (the users' "
        "`$scram-sha-256$` entries of `password_file`, written by `shoal passwd --scram`); "
        "empty: a CONNECT with an Authentication Method gets CONNACK 0x8C.",
        _one_of("", "SCRAM-SHA-256"))
    tls_identity_as_username: bool = _opt(
        False, "On the TLS listeners, a client's verified certificate is its login: the "
        "subject's common name is its username (no password asked); needs `tls_ca`.")
    # -- what clients may do (node/acl.py) -----------------------------------------------
    acl_file: str = _opt(
        "", "ACL file in Mosquitto's `acl_file` format (`user`, `topic [read|write|readwrite|"
        "deny]`, `pattern` with `%u` / `%c`): once set, what it does not grant is denied "
        "(SUBACK 0x87 / 0x80, PUBACK 0x87). Reread on SIGHUP.")
    bind_client_id: bool = _opt(
        False, "A ClientID whose session exists can only be used by the username that "
        "created it (in the whole cluster); another user is refused with CONNACK 0x87 / 5 "
        "and the session's client stays connected.")
    # -- behind a load balancer (node/proxy_protocol.py, deploy/haproxy) ------------------
    proxy_protocol: bool = _opt(
        False, "The MQTT TCP listener (`mqtt_port`) expects a PROXY protocol v1/v2 header "
        "(HAProxy's `send-proxy-v2`) before MQTT and closes connections without one; logs and "
        "the admin API then show the client's real address.")
    proxy_protocol_trusted: str = _opt(
        "", "With `proxy_protocol`: comma-separated addresses or networks (e.g. "
        "`10.0.0.0/8,127.0.0.1`) allowed to connect and send the header; others are closed. "
        "Empty: any.", _networks)
    admin_host: str = _opt("127.0.0.1", "Address the admin HTTP API binds to.")
    admin_port: int = _opt(8080, "Admin HTTP API port; 0 disables the admin server.",
                           _int_range(0, 65535))
    admin_token: str = _opt(
        "", "Bearer token the admin API asks of every request but `/healthz`, `/readyz`, the "
        "dashboard page and (see `admin_metrics_open`) `/metrics` (at least 16 characters; "
        "the CLI sends `SHOAL_ADMIN_TOKEN`). Empty: no token (see Security).",
        lambda v: None if not v or len(v) >= 16 else "must be at least 16 characters")
    admin_token_file: str = _opt(
        "", "File holding `admin_token` (its first line), read at start; instead of "
        "`admin_token`, so the token is not on a command line.")
    admin_metrics_open: bool = _opt(
        True, "With a token: `/metrics` is served without it (for scrapers).")
    data_dir: str = _opt("./data", "Directory for the durable session store.")
    log_level: str = _opt("info", "Log level: debug, info, warning or error.", _one_of(*LOG_LEVELS))
    session_expiry_311: int = _opt(
        7200, "Seconds an MQTT 3.1.1 Clean Session 0 session outlives its connection.",
        _int_range(0))
    max_session_expiry: int = _opt(
        604800, "Cap, in seconds, on an MQTT 5.0 client's Session Expiry Interval (7 days by "
        "default: a client asking for more, or for never, is told this one in CONNACK; "
        "4294967295 lets sessions never expire).", _int_range(0, 4294967295))
    max_inflight: int = _opt(32, "Outgoing QoS 1/2 messages awaiting acknowledgement per session.",
                             _int_range(1, 65535))
    max_queue: int = _opt(1000, "Messages queued per session beyond the inflight window "
                          "(see Sessions and queues for what happens past it).", _int_range(1))
    queue_qos0_offline: bool = _opt(False, "Also queue QoS 0 messages for offline sessions.")
    max_queue_bytes: int = _opt(
        16 << 20, "Bytes (payloads and topics) queued per session at most, besides the count "
        "`max_queue`; past it the same drop policy applies (the oldest QoS 0 message, else "
        "the oldest); 0 = no byte cap.", _int_range(0))
    max_packet_size: int = _opt(1048576, "Largest MQTT packet accepted, in bytes.",
                                _int_range(16, 268435460))
    max_connections: int = _opt(
        0, "Connections a node takes at most (every listener); past it new ones are closed at "
        "once. 0: the open-file limit less 256 descriptors kept for the store, the cluster "
        "and the admin API (a node never runs out of them for its own files).",
        _int_range(0))
    max_connections_per_address: int = _opt(
        0, "Connections from one source address at most (with `proxy_protocol`: the "
        "client's real address); 0 = no limit (mind NAT and load balancers).", _int_range(0))
    max_connection_rate: int = _opt(
        0, "New connections per second from one source address at most; past it they are "
        "closed at once; 0 = no limit.", _int_range(0))
    flapping_connects: int = _opt(
        0, "A ClientID that connects more than this many times within `flapping_window` "
        "seconds is refused for `flapping_ban` seconds (CONNACK 0x9F / 3); 0 = off.",
        _int_range(0))
    flapping_window: float = _opt(60.0, "Seconds over which `flapping_connects` counts.",
                                  _positive_number)
    flapping_ban: float = _opt(60.0, "Seconds a flapping ClientID is refused.",
                               _positive_number)
    connect_timeout: float = _opt(
        10.0, "Seconds a new connection may take to send its CONNECT, on every listener (the "
        "TLS handshake and the WebSocket upgrade included): then it is closed.",
        _positive_number)
    max_subscriptions: int = _opt(
        1000, "Subscriptions one session may hold: a SUBSCRIBE past it gets 0x97 (quota "
        "exceeded) / 0x80 for the new filters (a filter already held may be replaced); 0 = "
        "no limit.", _int_range(0))
    max_topic_levels: int = _opt(
        128, "Most levels in a topic name or filter: a deeper PUBLISH is not routed (PUBACK / "
        "PUBREC 0x90 for MQTT 5), a deeper SUBSCRIBE filter gets SUBACK 0x8F / 0x80, a "
        "deeper will topic CONNACK 0x90.", _int_range(1, 65535))
    max_topic_length: int = _opt(
        65535, "Longest topic name or filter in bytes (UTF-8), with the same answers as "
        "`max_topic_levels`.", _int_range(1, 65535))
    max_client_id_length: int = _opt(
        256, "Longest ClientID in characters: a longer one gets CONNACK 0x85 / 2 (identifier "
        "rejected).", _int_range(23, 65535))
    receive_maximum: int = _opt(65535, "Inbound QoS 2 messages an MQTT 5.0 client may leave "
                                "unreleased (Receive Maximum, told in CONNACK; more: "
                                "DISCONNECT 0x93; 3.1.1 clients are not told, they may use "
                                "every packet id).", _int_range(1, 65535))
    topic_alias_maximum: int = _opt(64, "Topic aliases a MQTT 5.0 client may use towards us "
                                    "(0 disables them).", _int_range(0, 65535))
    max_keep_alive: int = _opt(600, "Keep-alive cap in seconds: a client asking for more, or "
                               "for 0 (none), gets this one (MQTT 5: told as Server Keep "
                               "Alive) and is closed after 1.5 times it without a packet; 0 "
                               "accepts any keep-alive, 0 included (a silent connection is "
                               "then never closed).", _int_range(0, 65535))
    retain_available: bool = _opt(True, "Accept and store retained messages.")
    max_retained: int = _opt(
        100_000, "Retained messages a node keeps at most: a retained PUBLISH to a new topic "
        "past it is not accepted (PUBACK / PUBREC 0x97 for MQTT 5; 3.1.1: acknowledged and "
        "dropped); replacing or clearing one is accepted. 0 = no limit.", _int_range(0))
    max_retained_bytes: int = _opt(
        256 << 20, "Bytes (payloads and topics) of retained messages a node keeps at most: a "
        "retained PUBLISH that would grow them past it gets the same answer as past "
        "`max_retained`; 0 = no limit.", _int_range(0))
    max_qos: int = _opt(2, "Highest QoS granted to subscriptions and accepted on PUBLISH.",
                        _int_range(0, 2))
    write_buffer_high: int = _opt(262144, "Per-connection transport high-water mark in bytes; "
                                  "past it deliveries to that client pause.", _int_range(1))
    max_output_buffer: int = _opt(
        8 << 20, "Bytes waiting to be sent to one client at most: messages stop at "
        "`write_buffer_high` (the session queues them), but acknowledgements and PINGRESPs of "
        "a client that never reads are closed past this.", _int_range(65536))
    shutdown_grace: float = _opt(5.0, "Seconds a stopping node waits for connections to close "
                                 "and the store to flush.", _non_negative_number)
    durability: str = _opt(
        "safe", "Store writes: `safe` fsyncs before acknowledging, `fast` acknowledges at once "
        "and fsyncs within ~10 ms (see Durability).", _one_of("safe", "fast"))
    store_compact_bytes: int = _opt(
        16 << 20, "The store compacts (rewrites what is live, deletes the rest) once its "
        "files pass this size and twice what is live.", _int_range(4096, 1 << 40))
    # -- cluster (all off while cluster_port is 0) --------------------------------------
    cluster_port: int = _opt(0, "Node-to-node port; 0 runs a single node without a cluster.",
                             _int_range(0, 65535))
    raft_port: int = _opt(0, "Raft port; 0 means cluster_port + 1.", _int_range(0, 65535))
    advertise_host: str = _opt("", "Address other nodes and clients use to reach this node; "
                               "empty means `host`.")
    join: str = _opt("", "Comma-separated `host:port` node-to-node addresses of members "
                     "to join through (a DNS name with several addresses counts as several). "
                     "A node that has been a member rejoins through the members it stored in "
                     "`data_dir`, without it. Empty, with `discovery none` and nothing "
                     "stored: founds a new cluster.")
    discovery: str = _opt("none", "How to find peers besides `join`: `none` or `mdns` "
                          "(zeroconf on the LAN).", _one_of("none", "mdns"))
    bootstrap_expect: int = _opt(
        0, "Nodes that form a new cluster together: wait until this many nodes without a "
        "cluster see each other (through `join` and `discovery`), then the first ones by node "
        "id start it with each other as the Raft voters. 0: a `join` list that names this node "
        "itself counts as the full initial member list (like etcd's initial cluster); else "
        "the node only joins a running cluster (or, with no `join`, founds one alone).",
        _int_range(0, 99))
    new_cluster: bool = _opt(
        False, "Drop the membership stored in `data_dir` (logged first; the stored sessions "
        "stay) and start as a new node: without `join` it founds a new cluster, with "
        "`join` it joins or bootstraps as any new node does. For disaster recovery (the "
        "cluster lost its majority for good): set it for one start, then remove it.")
    cluster_name: str = _opt("shoal", "Nodes only join a cluster of the same name.")
    cluster_secret: str = _opt("", "Shared secret of the cluster: node links prove it at their "
                               "handshake and encrypt every frame with keys derived from it, "
                               "Raft traffic is encrypted with it (see Security); required "
                               "when cluster_port is set; at least 16 characters, never an "
                               "example's placeholder (make one: `openssl rand -hex 24`).",
                               _secret)
    takeover_timeout: float = _opt(5.0, "Seconds a CONNECT waits to take its session over from "
                                   "another node (or for a Raft quorum) before the "
                                   "`unreachable_owner` policy applies.", _non_negative_number)
    unreachable_owner: str = _opt(
        "refuse", "When the node holding a session cannot be reached in time: `refuse` answers "
        "CONNACK 0x88 (server unavailable) so the client retries and the session survives "
        "until its node is back; `fresh` starts a new session (CONNACK session present = 0) "
        "and loses what the old one held.", _one_of("fresh", "refuse"))
    session_replicas: int = _opt(
        1, "Replica nodes per persistent session: every change to its stored state also "
        "goes, in order, to them, and an acknowledgement waits for their store too; when "
        "its node is declared down the session is promoted on one of them. 0: not "
        "replicated (a session lives and dies with its node).", _int_range(0, 4))
    replica_timeout: float = _opt(
        2.0, "Seconds a replica may leave a change unacknowledged before it is dropped "
        "from that session's in-sync replicas (through Raft) and re-seeded: a session never "
        "blocks on a dead replica for longer.", _positive_number)
    failover_timeout: float = _opt(
        3.0, "Seconds a node may be silent on its node link before the Raft leader "
        "declares it down (committed through Raft) and its replicated sessions are "
        "promoted on their replicas.", _positive_number)
    minority_clean_sessions: bool = _opt(
        False, "In a Raft minority, accept clean sessions (clean start, expiry 0) without a "
        "ClientID claim: they work, but ClientID uniqueness is not enforced for them.")
    raft_compaction_entries: int = _opt(
        20_000, "Raft log entries after which (and `raft_compaction_seconds` after the last "
        "time) the routing table's log is compacted into a snapshot; a node that lags "
        "further behind (after a partition) gets the snapshot instead of the entries.",
        _int_range(10))
    raft_compaction_seconds: float = _opt(60.0, "Seconds between two Raft log compactions, "
                                          "at least (see `raft_compaction_entries`).",
                                          _positive_number)
    barrier_timeout: float = _opt(3.0, "Seconds between two checks of a session hand-over for "
                                  "nodes whose barrier is missing: one that left the cluster "
                                  "is not waited for any more (one that is down or cut off is, "
                                  "until it is back); a new claim waits this long plus 1 s "
                                  "for the previous hand-over before it takes the session on.",
                                  _non_negative_number)
    drain_delay: float = _opt(2.0, "Seconds a leaving node (`shoal cluster leave`) reports not "
                              "ready (GET /readyz 503) before it disconnects its clients, so "
                              "the load balancer stops sending it new ones first.",
                              _non_negative_number)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name), source=None)
        _check_listeners(self)
        _check_admin(self)


def is_loopback(host: str) -> bool:
    """Is ``host`` (an address or ``localhost``) reachable from this machine only?"""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_admin(c: Config) -> None:
    if c.admin_port and not is_loopback(c.admin_host) and not (c.admin_token or
                                                                c.admin_token_file):
        raise ConfigError(f"admin_host = {c.admin_host} is reachable from other machines: "
                          "set admin_token or admin_token_file (make one: `openssl rand -hex "
                          "24`), bind the admin API to 127.0.0.1, or set admin_port = 0")


def _check_listeners(c: Config) -> None:
    """Listener options that only make sense together (the files themselves are read, and
    refused with the option's name, when the node starts: node/tls.py)."""
    tls_ports = [name for name in ("tls_port", "wss_port") if getattr(c, name)]
    if tls_ports and not (c.tls_cert and c.tls_key):
        raise ConfigError(f"{' and '.join(tls_ports)} need{'s' if len(tls_ports) == 1 else ''} "
                          "a certificate: set tls_cert and tls_key (PEM files), or set the "
                          "port to 0")
    if c.tls_require_client_cert and not c.tls_ca:
        raise ConfigError("tls_require_client_cert needs tls_ca (the PEM file of the CAs that "
                          "sign client certificates)")
    if c.enhanced_auth and not c.password_file:
        raise ConfigError("enhanced_auth needs password_file (its users' SCRAM entries: "
                          "`shoal passwd --scram FILE USER`)")
    if c.tls_identity_as_username and not c.tls_ca:
        raise ConfigError("tls_identity_as_username needs tls_ca (client certificates are "
                          "asked for and checked only with it)")
    ports = [(name, getattr(c, name)) for name in ("mqtt_port", "ws_port", "tls_port",
                                                   "wss_port")]
    if not any(port for _, port in ports):
        raise ConfigError("every MQTT listener is off (mqtt_port, ws_port, tls_port and "
                          "wss_port are 0): turn one on")
    seen: dict[int, str] = {}
    for name, port in ports:
        if port and port in seen:
            raise ConfigError(f"{name} = {port} is also {seen[port]}: give each listener its "
                              "own port")
        seen.setdefault(port, name)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def flag(name: str) -> str:
    """The command-line flag for a field: ``mqtt_port`` -> ``--mqtt-port``."""
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable for a field: ``mqtt_port`` -> ``SHOAL_MQTT_PORT``."""
    return ENV_PREFIX + name.upper()


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_value(name: str, text: str) -> Any:
    """Convert the string form of field ``name`` (from the environment or a flag) to its type."""
    kind = FIELDS[name].type
    text = text.strip()
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{text!r} is not a boolean: use one of 1/0, true/false, yes/no, on/off")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{text!r} is not an integer: use digits only, e.g. 1883") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{text!r} is not a number: use e.g. 5 or 2.5") from None
    return text


def _typed(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Check a value that arrived already typed (TOML, overrides); strings are converted."""
    if isinstance(value, bool) and f.type == "str" and f.metadata.get("check") and \
            not f.metadata["check"]("true"):
        value = "true" if value else "false"  # (TOML `allow_anonymous = true`)
    if isinstance(value, str) and f.type != "str":
        try:
            return parse_value(f.name, value)
        except ConfigError as e:
            raise ConfigError(f"{f.name} {_where(source)}: {e}") from None
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }[f.type](value)
    if not ok:
        raise ConfigError(f"{f.name} {_where(source)} must be {_a(f.type)}, got {value!r}")
    return float(value) if f.type == "float" else value


def _a(kind: str) -> str:
    return {"bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string"}[kind]


def _where(source: str | None) -> str:
    return f"(from {source})" if source else ""


def _check(f: dataclasses.Field, value: Any, source: str | None) -> None:
    check = f.metadata.get("check")
    problem = check(value) if check else None
    if problem:
        where = f" {_where(source)}" if source else ""
        shown = "(hidden)" if "secret" in f.name or "token" in f.name else repr(value)
        raise ConfigError(f"{f.name} = {shown}{where} is invalid: {problem}")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the --config path") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for key, value in data.items():
        if key not in FIELDS:
            raise ConfigError(
                f"unknown key {key!r} in config file {path}: valid keys are "
                + ", ".join(FIELDS) + " (flat, at the top level)")
    return data


def load_config(overrides: Mapping[str, Any] | argparse.Namespace | None = None,
                env: Mapping[str, str] = os.environ) -> Config:
    """Build the Config: defaults < TOML file < ``SHOAL_*`` env vars < ``overrides``.

    ``overrides`` holds values from the command line, keyed by field name; ``None``
    means "not given".  Its ``config`` key, else ``SHOAL_CONFIG``, names a TOML file.
    An argparse Namespace is accepted too; attributes that are not fields are ignored.
    Raises ConfigError, whose message names the option, where it came from and what to do.
    """
    if overrides is None:
        given: dict[str, Any] = {}
    elif isinstance(overrides, argparse.Namespace):
        given = {k: v for k, v in vars(overrides).items() if k in FIELDS or k == "config"}
    else:
        given = dict(overrides)
        unknown = [k for k in given if k not in FIELDS and k != "config"]
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r}: valid options are "
                              + ", ".join(FIELDS))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    config_file = given.pop("config", None) or env.get(CONFIG_FILE_ENV) or None
    if config_file:
        for key, value in _read_toml(config_file).items():
            values[key] = _typed(FIELDS[key], value, f"{config_file}")
            sources[key] = config_file

    for name in FIELDS:
        text = env.get(env_var(name))
        if text is None:
            continue
        try:
            values[name] = parse_value(name, text)
        except ConfigError as e:
            raise ConfigError(f"{env_var(name)}: {e}") from None
        sources[name] = env_var(name)

    for name, value in given.items():
        if value is None:
            continue
        values[name] = _typed(FIELDS[name], value, flag(name))
        sources[name] = flag(name)

    for name, value in values.items():
        _check(FIELDS[name], value, sources[name])

    if not values.get("node_id"):
        port = values.get("mqtt_port", FIELDS["mqtt_port"].default)
        values["node_id"] = f"{socket.gethostname()}-{port}"
        sources["node_id"] = "hostname"
        _check(FIELDS["node_id"], values["node_id"], "the host name; set --node-id")
    return Config(**values)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _shown_default(f: dataclasses.Field) -> str:
    if f.metadata.get("shown_default"):
        return f.metadata["shown_default"]
    value = f.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value}`"


def options_markdown() -> str:
    """The README's option table, generated from Config's field metadata."""
    lines = [
        "| Flag | Environment variable | TOML key | Default | Meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in dataclasses.fields(Config):
        fl = f"`{flag(f.name)}` / `--no-{flag(f.name)[2:]}`" if f.type == "bool" else f"`{flag(f.name)}`"
        lines.append(f"| {fl} | `{env_var(f.name)}` | `{f.name}` | {_shown_default(f)} "
                     f"| {_cell(f.metadata['help'])} |")
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- BEGIN OPTIONS: generated by `python -m node.config README.md`; do not edit -->"
README_END = "<!-- END OPTIONS -->"


def _splice_readme(path: str) -> None:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    head, sep, rest = text.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not (sep and sep2):
        raise SystemExit(f"{path}: markers {README_BEGIN!r} ... {README_END!r} not found")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(head + README_BEGIN + "\n" + options_markdown() + README_END + tail)


if __name__ == "__main__":
    # `python -m node.config` prints the table; with a path it rewrites that README's block.
    if len(sys.argv) > 1:
        _splice_readme(sys.argv[1])
    else:
        sys.stdout.write(options_markdown())
