"""`python -m node run` as a real process: bad settings exit 2 with a message naming the
setting, and nothing is left listening. (tests/unit/test_cli.py covers --mqtt-port and
config files; these are the broker limits the integration suite itself relies on.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from support import REPO_ROOT, free_port

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.shoal_only("the CLI of shoal")]


def _run(args, extra_env=None, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra_env or {})
    port = free_port()
    cmd = [sys.executable, "-m", "node", "run", "--node-id", "cli", "--host", "127.0.0.1",
           "--mqtt-port", str(port), "--admin-port", str(free_port()),
           "--data-dir", str(tmp_path), *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=20)
    return result, port


@pytest.mark.parametrize("args, names", [
    (["--max-inflight", "abc"], "--max-inflight"),
    (["--max-inflight", "0"], "--max-inflight"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--session-expiry-311", "soon"], "--session-expiry-311"),
    (["--receive-maximum", "70000"], "--receive-maximum"),
    (["--topic-alias-maximum", "-3"], "--topic-alias-maximum"),
    (["--max-qos", "3"], "--max-qos"),
    (["--max-keep-alive", "70000"], "--max-keep-alive"),
    (["--log-level", "loud"], "--log-level"),
])
def test_bad_flag_value_exits_2_naming_the_flag(tmp_path, args, names):
    result, port = _run(args, tmp_path=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert names in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_bad_environment_value_exits_2_naming_the_variable(tmp_path):
    result, _ = _run([], {"SHOAL_MAX_QUEUE": "lots"}, tmp_path=tmp_path)
    assert result.returncode == 2
    assert "SHOAL_MAX_QUEUE" in result.stderr and "Traceback" not in result.stderr


def test_unknown_flag_exits_2(tmp_path):
    result, _ = _run(["--max-inflite", "4"], tmp_path=tmp_path)
    assert result.returncode == 2
    assert "--max-inflite" in result.stderr
