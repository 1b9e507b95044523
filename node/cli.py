"""The ``shoal`` command: argument parsing, logging set-up, and hand-off to the node.

Subcommands are a table (:data:`COMMANDS`): each entry adds its arguments to a
sub-parser and names the function that runs it.  ``cluster``, ``clients``,
``sessions`` and ``kick`` will be added the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
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
        help_text = help_text.replace("`", "")
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


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    handler: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: tuple[Command, ...] = (
    Command("run", "run a broker node until SIGINT/SIGTERM", cmd_run, _add_run_arguments),
    Command("version", "print the version", cmd_version),
    # later: cluster ..., clients ..., sessions ..., kick
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


__all__ = ["COMMANDS", "Command", "LineFormatter", "build_parser", "configure_logging", "main"]
