"""The ``shoal`` command: argument parsing, logging set-up, and hand-off to the node.

Subcommands are a table (:data:`COMMANDS`): each entry adds its arguments to a
sub-parser and names the function that runs it.  ``clients``, ``sessions`` and ``kick``
are HTTP clients of a node's admin API (``--admin URL``, env ``SHOAL_ADMIN``) and work
against a node alone as well as a cluster node; ``cluster`` (cluster/main.py) adds its
commands the same way and uses the same helpers (:func:`admin_call`, :func:`format_table`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from importlib import metadata

from node.config import CONFIG_FILE_ENV, Config, ConfigError, env_var, flag, load_config

log = logging.getLogger("node.cli")

# LogRecord attributes that are not user data: everything else on a record
# (``extra={"client_id": ...}``) is rendered as key=value.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and not any(c.isspace() or c in '="\\' for c in text):
        return text
    return json.dumps(text)


class LineFormatter(logging.Formatter):
    """One line per record: ``ts level logger node=<id> msg key=value ...``.

    ``ts`` is UTC ISO 8601 with milliseconds. Key/values come from ``extra=``;
    an exception is appended as ``exc=`` with its traceback JSON-quoted, so a
    record never spans lines.
    """

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"{ts}.{int(record.msecs):03d}Z",
            record.levelname.lower(),
            record.name,
            f"node={_logfmt_value(self.node_id)}",
            record.getMessage().replace("\n", "\\n"),
        ]
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                parts.append(f"{key}={_logfmt_value(value)}")
        if record.exc_info:
            parts.append("exc=" + json.dumps(self.formatException(record.exc_info)))
        return " ".join(parts)


def configure_logging(config: Config, stream=None) -> None:
    """Send every log record, one line each, to stderr at the configured level."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LineFormatter(config.node_id))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())


def version() -> str:
    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


# --- subcommands ---------------------------------------------------------------------------

def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml",
                        help=f"TOML file with options as flat top-level keys [env {CONFIG_FILE_ENV}]")
    for f in dataclasses.fields(Config):
        default = f.metadata.get("shown_default") or f.default
        help_text = f"{f.metadata['help']} [default: {default}; env {env_var(f.name)}]"
        help_text = help_text.replace("`", "").replace("%", "%%")  # (argparse formats help)
        if f.type == "bool":
            parser.add_argument(flag(f.name), dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            # Values stay strings here: load_config converts and validates them, so a
            # bad flag and a bad environment variable fail with the same kind of message.
            parser.add_argument(flag(f.name), dest=f.name, default=None,
                                metavar=f.type.upper(), help=help_text)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args)
    extensions_for = getattr(args, "extensions_for", None)
    if config.cluster_port and extensions_for is None:
        raise ConfigError("cluster_port is set, but `python -m node` runs a node alone: use "
                          "the `shoal` command (or `python -m cluster`) to run a cluster node")
    extensions = extensions_for(config) if extensions_for is not None else ()
    configure_logging(config)
    log.info("starting", extra={"version": version(), "mqtt": f"{config.host}:{config.mqtt_port}",
                                "admin_port": config.admin_port, "data_dir": config.data_dir})
    from node.server import run_node  # lazy: `shoal --help` must work without the server

    return run_node(config, extensions)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"shoal {version()}")
    return 0


# --- operator commands: HTTP clients of the admin API --------------------------------------

DEFAULT_ADMIN = "http://127.0.0.1:8080"


def add_admin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", metavar="URL",
                        default=os.environ.get("SHOAL_ADMIN", DEFAULT_ADMIN),
                        help=f"admin API URL of a node [default: {DEFAULT_ADMIN}; "
                             "env SHOAL_ADMIN]")


def admin_headers() -> dict:
    """The token of a node's admin API (``admin_token``), from ``SHOAL_ADMIN_TOKEN``."""
    token = os.environ.get("SHOAL_ADMIN_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def admin_answer(method: str, base: str, path: str, timeout: float = 10.0,
                 body: dict | None = None) -> tuple[int, dict]:
    """``(HTTP status, decoded JSON)`` of ``method base+path`` (``body`` sent as JSON); an
    error answer is an answer too (``{"error": ...}`` when it is not JSON). A node that
    does not answer, or answers something else than JSON, ends the command with one line
    on stderr saying what to do, exit code 1 (SystemExit)."""
    if "://" not in base:
        base = "http://" + base
    url = base.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else (
        b"" if method == "POST" else None)
    headers = admin_headers()
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or "error" not in answer:
            answer = {"error": text.strip() or str(err.reason)}
        return err.code, answer
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise SystemExit(f"shoal: cannot reach the admin API at {base} ({reason}); is the "
                         "node running? pass --admin http://HOST:PORT of a node "
                         "(or set SHOAL_ADMIN)") from None
    except ValueError as err:
        raise SystemExit(f"shoal: {url} did not answer JSON ({err}); is --admin the admin "
                         "port of a Shoal node?") from None


def admin_call(method: str, base: str, path: str, timeout: float = 10.0):
    """The decoded JSON answer of ``method base+path``. Anything else ends the command
    with one line on stderr saying what to do, exit code 1 (SystemExit)."""
    status, answer = admin_answer(method, base, path, timeout)
    if status >= 400:
        url = ("" if "://" in base else "http://") + base.rstrip("/") + path
        raise SystemExit(f"shoal: {url} answered {status}: {answer['error']}")
    return answer


def format_table(rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in rows)


def _quote(client_id: str) -> str:
    return urllib.parse.quote(client_id, safe="")


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _page(args: argparse.Namespace, path: str) -> dict | None:
    """One page of a paged endpoint (``--limit``, ``--after``); printed and None with
    ``--json``."""
    query = {"limit": args.limit}
    if args.after:
        query["after"] = args.after
    page = admin_call("GET", args.admin, f"{path}?{urllib.parse.urlencode(query)}")
    if args.json:
        print(json.dumps(page, indent=2))
        return None
    return page


def cmd_clients(args: argparse.Namespace) -> int:
    page = _page(args, "/api/v1/clients")
    if page is None:
        return 0
    rows = [["CLIENT ID", "PEER", "PROTOCOL", "KEEPALIVE", "SUBS", "QUEUED", "INFLIGHT"]]
    for c in page["items"]:
        rows.append([c["client_id"], c["peer"], c["protocol"], f"{c['keep_alive_s']:g}s",
                     c["subscriptions"], c["queued"], c["inflight"]])
    print(format_table(rows))
    more = f"; next page: --after {page['next']}" if page["next"] is not None else ""
    print(f"{len(page['items'])} of {page['total']} clients connected to this node{more}")
    return 0


def cmd_sessions_list(args: argparse.Namespace) -> int:
    page = _page(args, "/api/v1/sessions")
    if page is None:
        return 0
    rows = [["CLIENT ID", "STATE", "SUBS", "QUEUED", "INFLIGHT", "EXPIRY"]]
    for s in page["items"]:
        rows.append([s["client_id"], s["state"], s["subscriptions"], s["queued"],
                     s["inflight"], "never" if s["expiry_interval"] is None
                     else f"{s['expiry_interval']}s"])
    print(format_table(rows))
    more = f"; next page: --after {page['next']}" if page["next"] is not None else ""
    print(f"{len(page['items'])} of {page['total']} sessions on this node{more}")
    return 0


def cmd_sessions_show(args: argparse.Namespace) -> int:
    s = admin_call("GET", args.admin, "/api/v1/sessions/" + _quote(args.client_id))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    lines = [("client id", s["client_id"]), ("owner", _dash(s.get("owner"))),
             ("epoch", _dash(s.get("epoch"))), ("holder", _dash(s.get("holder")))]
    if not s.get("here"):
        lines.append(("details", f"the session is on {_dash(s.get('holder'))}: run this "
                                 "with --admin of that node for the rest"))
    else:
        expiry = s["expiry_interval"]
        lines += [("state", s["state"]),
                  ("connected", "yes (" + s["peer"] + ")" if s["connected"] else "no"),
                  ("protocol", s["protocol"]), ("queued", s["queued"]),
                  ("inflight", s["inflight"]),
                  ("expiry", "never" if expiry is None else f"{expiry}s"),
                  ("expires at", "-" if s["expires_at"] is None else time.strftime(
                      "%Y-%m-%d %H:%M:%S", time.localtime(s["expires_at"]))),
                  ("will", "yes" if s["will"] else "no"),
                  ("subscriptions", len(s["subscriptions"]))]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    for sub in s.get("subscriptions") or ():
        opts = [f"qos {sub['qos']}"]
        if sub["no_local"]:
            opts.append("no local")
        if sub["retain_as_published"]:
            opts.append("retain as published")
        if sub["retain_handling"]:
            opts.append(f"retain handling {sub['retain_handling']}")
        if sub["subscription_id"]:
            opts.append(f"id {sub['subscription_id']}")
        print(f"  {sub['filter']}  ({', '.join(opts)})")
    return 0


def cmd_kick(args: argparse.Namespace) -> int:
    result = admin_call("DELETE", args.admin, "/api/v1/clients/" + _quote(args.client_id))
    via = " (forwarded)" if result.get("forwarded") else ""
    print(f"kicked {result['client_id']} on {result['node']}{via}")
    return 0


def _add_page_arguments(parser: argparse.ArgumentParser) -> None:
    add_admin_argument(parser)
    parser.add_argument("--limit", type=int, default=100, help="rows per page (1-1000)")
    parser.add_argument("--after", metavar="CURSOR",
                        help="the page after this one (as the previous page said)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_clients_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="clients_command", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="the clients connected to the node at --admin")
    _add_page_arguments(p)
    p.set_defaults(sub_handler=cmd_clients)


def _add_sessions_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sessions_command", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="the sessions on the node at --admin")
    _add_page_arguments(p)
    p.set_defaults(sub_handler=cmd_sessions_list)
    p = sub.add_parser("show", help="one session: owner, epoch, subscriptions, queue...")
    p.add_argument("client_id", metavar="CLIENTID")
    add_admin_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(sub_handler=cmd_sessions_show)


def _add_kick_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("client_id", metavar="CLIENTID")
    add_admin_argument(parser)


def cmd_passwd(args: argparse.Namespace) -> int:
    """``shoal passwd FILE USER`` (asks for the password twice), ``-b FILE USER PASSWORD``
    (for scripts, as ``mosquitto_passwd -b``), ``-D FILE USER`` (delete); ``--scram``
    writes a SCRAM-SHA-256 entry. The file's other lines stay as they are; a running node
    rereads it on SIGHUP."""
    from .auth import PasswordFileError, hash_password, parse_password_file, write_entry
    path = args.file
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        if args.delete:
            raise SystemExit(f"shoal passwd: {path} does not exist") from None
        text = ""
    except OSError as err:
        raise SystemExit(f"shoal passwd: cannot read {path}: {err.strerror}") from None
    try:
        users = parse_password_file(text, path)
        if args.delete:
            if args.user not in users:
                raise SystemExit(f"shoal passwd: no user {args.user!r} in {path}")
            text = write_entry(text, args.user, None)
        else:
            password = args.password
            if password is None:
                import getpass
                password = getpass.getpass(f"Password for {args.user}: ")
                if getpass.getpass("Again: ") != password:
                    raise SystemExit("shoal passwd: the passwords differ; nothing changed")
            if not password:
                raise SystemExit("shoal passwd: an empty password is not allowed")
            if args.scram:
                from .scram import scram_entry
                hashed = scram_entry(password)
            else:
                hashed = hash_password(password)
            text = write_entry(text, args.user, hashed)
    except PasswordFileError as err:
        raise SystemExit(f"shoal passwd: {err}") from None
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    action = "deleted" if args.delete else ("changed" if args.user in users else "added")
    print(f"{args.user} {action} in {path} (a running node rereads it on SIGHUP)")
    return 0


def _add_passwd_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-b", dest="batch", action="store_true",
                      help="take the password from the command line (scripts)")
    mode.add_argument("-D", dest="delete", action="store_true", help="delete the user")
    parser.add_argument("file", metavar="FILE", help="the password file (created if missing)")
    parser.add_argument("user", metavar="USER")
    parser.add_argument("password", metavar="PASSWORD", nargs="?",
                        help="with -b only")
    parser.add_argument("--scram", action="store_true",
                        help="write a SCRAM-SHA-256 entry (for MQTT 5 enhanced authentication, "
                        "enhanced_auth; plain CONNECT passwords work with it too) instead of "
                        "scrypt")

    def check(args: argparse.Namespace) -> int:
        if args.batch != (args.password is not None):
            parser.error("PASSWORD is given with -b, and only then")
        return cmd_passwd(args)
    parser.set_defaults(passwd_handler=check)


def _passwd(args: argparse.Namespace) -> int:
    return args.passwd_handler(args)


def _sub_command(args: argparse.Namespace) -> int:
    return args.sub_handler(args)


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    handler: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: tuple[Command, ...] = (
    Command("run", "run a broker node until SIGINT/SIGTERM", cmd_run, _add_run_arguments),
    Command("version", "print the version", cmd_version),
    Command("clients", "list the clients connected to a node (admin API)", _sub_command,
            _add_clients_arguments),
    Command("sessions", "list sessions or show one (admin API)", _sub_command,
            _add_sessions_arguments),
    Command("kick", "disconnect a client (MQTT 5: reason 0x98), wherever in the cluster",
            cmd_kick, _add_kick_arguments),
    Command("passwd", "add, change or delete a user of a password file (password_file)",
            _passwd, _add_passwd_arguments),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Shoal: a clustered MQTT 3.1.1 / 5.0 broker.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if command.add_arguments:
            command.add_arguments(p)
        p.set_defaults(handler=command.handler)
    return parser


def main(argv: Sequence[str] | None = None, commands: Sequence[Command] = COMMANDS,
         extensions_for=None) -> int:
    """``extensions_for(config)``: what ``run`` plugs into the node (the cluster's entry
    point passes its own; ``python -m node`` runs a node alone)."""
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    args.extensions_for = extensions_for
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"shoal: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


__all__ = ["COMMANDS", "DEFAULT_ADMIN", "Command", "LineFormatter", "add_admin_argument",
           "admin_call", "build_parser", "configure_logging", "format_table", "main"]
