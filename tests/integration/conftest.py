"""Fixtures of the integration suite: the broker under test as a real process.

How it works
------------
* ``start_node(**flags)`` starts ``python -m node run`` (cwd = repository root,
  PYTHONPATH = repository root) on free ports with its own data directory and waits until
  the MQTT port accepts connections and ``/healthz`` says ok. Flags are the broker's
  options with underscores (``max_queue=10``; ``True``/``False`` give ``--x``/``--no-x``).
  ``node`` is a default node per test. Nodes are stopped with SIGTERM, then SIGKILL after
  5 s; every failing test's report carries the log tail of the nodes that were running.
* Clients come from the node: ``node.paho(client_id, version, ...)`` (paho-mqtt 2.x,
  CallbackAPIVersion.VERSION2, never reconnects by itself) and ``node.raw(version)``
  (tests/support.py's socket client with its own independent codec, for what paho
  cannot do: not acknowledging, bad frames, DUP flags, packet ids). They are closed
  after each test.
* Synchronisation is by condition with a deadline (``support.wait_for``); negative
  checks observe a bounded window (``holds_for``, ``RawClient.recv_nothing_for``);
  ``let_time_pass`` is only used where elapsed time is the behaviour (expiry, delays).

Environment
-----------
``SHOAL_TEST_BROKER``: ``shoal`` (default) or ``mosquitto`` (a local Mosquitto 2.0 with the
same defaults, to check the tests themselves). Under Mosquitto, tests marked
``shoal_only`` are skipped and those marked ``mosquitto_deviates`` are expected to fail.
``SHOAL_FUZZ_SEED`` replays a live-fuzz run.

Run from the repository root: ``.venv/bin/pytest tests/integration -q``
"""

from __future__ import annotations

import os

import pytest

from support import BrokerProcess, LIVE_NODES

BROKER_KIND = os.environ.get("SHOAL_TEST_BROKER", "shoal")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shoal_only(reason): a Shoal policy or feature another broker need not have")
    config.addinivalue_line(
        "markers", "mosquitto_deviates(reason): spec behaviour Mosquitto 2.0.11 gets wrong "
                   "(expected to fail when the suite is pointed at Mosquitto)")


def pytest_collection_modifyitems(config, items):
    if BROKER_KIND == "shoal":
        return
    for item in items:
        marker = item.get_closest_marker("shoal_only")
        if marker is not None:
            reason = marker.args[0] if marker.args else "Shoal-specific behaviour"
            item.add_marker(pytest.mark.skip(reason=f"{BROKER_KIND}: {reason}"))
        marker = item.get_closest_marker("mosquitto_deviates")
        if marker is not None and BROKER_KIND == "mosquitto" and (
                marker.kwargs.get("only") is None or f"[{marker.kwargs['only']}" in item.name):
            reason = marker.args[0] if marker.args else "known Mosquitto deviation"
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))


def _start(workdir, options):
    node = BrokerProcess(BROKER_KIND, workdir, options)
    LIVE_NODES.append(node)
    try:
        node.start()
    except BaseException:
        node.stop()
        LIVE_NODES.remove(node)
        raise
    return node


def _stop(node):
    for client in node.clients:
        client.close()
    node.stop()
    if node in LIVE_NODES:
        LIVE_NODES.remove(node)


@pytest.fixture
def start_node(tmp_path):
    """Factory: ``start_node(max_queue=10, queue_qos0_offline=True)`` -> running node.
    Options are the broker's flags with underscores; True/False give --flag/--no-flag."""
    nodes = []

    def start(**options):
        node = _start(tmp_path, options)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        _stop(node)


@pytest.fixture
def node(start_node):
    """A node with default settings, fresh for this test."""
    return start_node()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    """A node with default settings shared by the tests of one module (each test uses
    its own ClientIDs and topics)."""
    node = _start(tmp_path_factory.mktemp("shared"), {})
    yield node
    _stop(node)


