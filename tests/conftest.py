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


@pytest.fixture
def toxiproxy(tmp_path):
    """A ``toxiproxy.Toxiproxy`` client (toxiproxy-python) pointed at a Toxiproxy server.

    With ``TOXIPROXY_URL`` set (e.g. ``http://127.0.0.1:8474``) that is the real Toxiproxy
    there: it must reach the upstreams the tests give it (127.0.0.1 ports), and the
    proxies a test creates are deleted after it. Otherwise it is tests/toxiproxy_server.py,
    started as a child process on a free port and stopped after the test. toxiproxy-python
    keeps its server address in class attributes (``update_api_consumer``), not the env."""
    import os
    import signal
    import subprocess
    from urllib.parse import urlsplit

    from toxiproxy import Toxiproxy

    from support import free_port, wait_for

    url = os.environ.get("TOXIPROXY_URL")
    proc = None
    log_path = tmp_path / "toxiproxy.log"
    if url:
        parts = urlsplit(url if "://" in url else "http://" + url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 8474
    else:
        host, port = "127.0.0.1", free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(TESTS_DIR / "toxiproxy_server.py"),
                 "--host", host, "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = Toxiproxy()
    client.update_api_consumer(host, port)

    def up():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"toxiproxy_server.py exited with {proc.returncode}:\n"
                                 f"{log_path.read_text(errors='replace')}")
        return client.running()

    wait_for(up, timeout=10, message=f"Toxiproxy API on {host}:{port}")
    before = set(client.proxies()) if url else set()
    try:
        yield client
    finally:
        if proc is None:
            for name, proxy in client.proxies().items():
                if name not in before:
                    proxy.destroy()
        else:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def pytest_addoption(parser):
    # here, not in tests/faults/conftest.py: options must be known before collection
    parser.addoption("--faults-seconds", type=float, default=None,
                     help="how long the end-to-end fault run of tests/faults (workload + "
                          "kill -9 / partition / toxic nemesis + checker) lasts: 60 by "
                          "default (the acceptance run), 600 for a soak.")
