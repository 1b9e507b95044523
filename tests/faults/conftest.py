"""Fault tests (issue 6): the cluster fixtures of tests/cluster and the ``--faults-seconds``
option. Test directories have no __init__.py and a conftest only serves its own directory,
so the fixture functions are imported here (a thin re-export), not redefined.

``netns_lab`` / ``netns_cluster``: a 3-node cluster whose nodes run in network namespaces
(tests/faults/netns.py) so that the nemesis can partition them. They need root, ``ip`` and
``iptables``: skipped without them, except under ``CI=true`` where that is a failure."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # checker, workload, nemesis

from support import REPO_ROOT  # noqa: E402

import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "shoal_cluster_conftest", REPO_ROOT / "tests" / "cluster" / "conftest.py")
_cluster_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cluster_conftest)

Cluster = _cluster_conftest.Cluster
cluster_factory = _cluster_conftest.cluster_factory
cluster = _cluster_conftest.cluster

import netns  # noqa: E402

NetnsCluster = netns.netns_cluster_class(Cluster)


#: how long the end-to-end fault run lasts without --faults-seconds (the acceptance run)
DEFAULT_FAULTS_SECONDS = 60.0


def faults_seconds(config) -> float:
    """``--faults-seconds``, or the 60 s acceptance run."""
    value = config.getoption("--faults-seconds")
    return DEFAULT_FAULTS_SECONDS if value is None else value


def pytest_collection_modifyitems(config, items):
    """The end-to-end fault test outlasts the suite's 120 s timeout: give it its own."""
    seconds = faults_seconds(config)
    for item in items:
        if item.get_closest_marker("faults"):
            item.add_marker(pytest.mark.timeout(seconds + 300))


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: end-to-end fault test (--faults-seconds)")


@pytest.fixture
def netns_lab():
    """A NetnsLab of 3 namespaces + bridge, torn down after the test (and checked gone)."""
    why = netns.unavailable()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: the partition tests must run here, but {why}")
        pytest.skip(f"network partition tests skipped: {why}")
    with netns.NetnsLab(3) as lab:
        yield lab


@pytest.fixture
def netns_cluster(netns_lab, tmp_path):
    """A formed 3-node NetnsCluster (node i in namespace i of ``netns_lab``); stopped, and
    every partition healed, before the lab goes."""
    workdir = tmp_path / "netns-cluster"
    workdir.mkdir(parents=True, exist_ok=True)
    c = NetnsCluster(workdir, netns_lab)
    try:
        c.start(3)
        yield c
    finally:
        try:
            netns_lab.heal_all()
        finally:
            c.stop()
