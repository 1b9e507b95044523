"""Test-wide setup: make the repository root and tests/ importable.

Test directories have no __init__.py (rootdir-relative layout); ``import support`` finds
tests/support.py and ``import node`` the package under test.
"""

import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

for path in (str(REPO_ROOT), str(TESTS_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402  (after the path setup above)

from support import LIVE_NODES  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the log tail of every node it had running."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for node in list(LIVE_NODES):
            if node.proc is None:
                state = "never started"
            elif node.alive():
                state = "alive"
            else:
                state = f"EXITED rc={node.proc.returncode}"
            name = getattr(node, "node_id", node.kind)
            admin = f" admin :{node.admin_port}" if getattr(node, "admin_port", None) else ""
            report.sections.append(
                (f"node {name} mqtt :{node.port}{admin} log tail ({state})",
                 node.log_tail()))


@pytest.fixture(params=[4, 5], ids=["v311", "v5"])
def version(request):
    """Protocol level: 4 = MQTT 3.1.1, 5 = MQTT 5.0."""
    return request.param


@pytest.fixture(autouse=True)
def _close_clients():
    """Close every client a test opened, also on nodes that outlive the test."""
    yield
    for node in list(LIVE_NODES):
        clients, node.clients = node.clients, []
        for client in clients:
            client.close()
