"""The `shoal` command: subcommands, exit codes, log line format."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from node import cli
from node.config import Config

REPO = Path(__file__).resolve().parents[2]


def shoal(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_help_lists_the_run_command():
    result = shoal("--help")
    assert result.returncode == 0
    assert "run" in result.stdout and "version" in result.stdout


def test_run_help_lists_every_option_with_its_env_var():
    result = shoal("run", "--help")
    assert result.returncode == 0
    out = " ".join(result.stdout.split())
    for flag in ("--mqtt-port", "--no-retain-available", "--session-expiry-311", "--config"):
        assert flag in out
    assert "SHOAL_MQTT_PORT" in out


def test_out_of_range_port_exits_2_with_a_clear_message():
    result = shoal("run", "--mqtt-port", "99999")
    assert result.returncode == 2
    assert "mqtt_port = 99999 (from --mqtt-port)" in result.stderr
    assert "0 to 65535" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_in_config_file_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("colour = 'blue'\n")
    result = shoal("run", "--config", str(path))
    assert result.returncode == 2
    assert "unknown key 'colour'" in result.stderr


def test_no_command_prints_usage_and_exits_2():
    result = shoal()
    assert result.returncode == 2
    assert "usage: shoal" in result.stderr


def test_version_prints_the_version():
    result = shoal("version")
    assert result.returncode == 0
    assert result.stdout.startswith("shoal ")


@pytest.fixture
def fake_server(monkeypatch):
    """Stands in for node.server so `run` can be tested without a listener."""
    calls: list[Config] = []
    module = types.ModuleType("node.server")

    def run_node(config: Config, extensions=()) -> int:
        calls.append(config)
        return 3

    module.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "node.server", module)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield calls
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_run_passes_the_config_to_run_node_and_returns_its_exit_code(fake_server, monkeypatch):
    monkeypatch.setenv("SHOAL_MAX_QUEUE", "9")
    code = cli.main(["run", "--mqtt-port", "1999", "--no-retain-available", "--node-id", "n7",
                     "--log-level", "warning"])
    assert code == 3
    (config,) = fake_server
    assert config.mqtt_port == 1999 and config.retain_available is False
    assert config.max_queue == 9 and config.node_id == "n7"


def test_log_lines_carry_node_id_and_key_values():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(cli.LineFormatter("n1"))
    logger = logging.getLogger("node.test_cli")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("client dropped", extra={"client_id": "c 1", "reason": "keep_alive"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    ts, level, name, node, rest = first.split(" ", 4)
    assert ts.endswith("Z") and "T" in ts
    assert (level, name, node) == ("warning", "node.test_cli", "node=n1")
    assert rest == 'client dropped client_id="c 1" reason=keep_alive'
    assert " failed exc=" in second and "RuntimeError: boom" in second
