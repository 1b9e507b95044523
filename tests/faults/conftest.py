"""Fault tests (issue 6): the cluster fixtures of tests/cluster and the ``--faults-seconds``
option. Test directories have no __init__.py and a conftest only serves its own directory,
so the fixture functions are imported here (a thin re-export), not redefined."""

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


DEFAULT_FAULTS_SECONDS = 20.0


def faults_seconds(config) -> float | None:
    return config.getoption("--faults-seconds")


def pytest_collection_modifyitems(config, items):
    """The end-to-end fault test outlasts the suite's 120 s timeout: give it its own."""
    seconds = faults_seconds(config) or DEFAULT_FAULTS_SECONDS
    for item in items:
        if item.get_closest_marker("faults"):
            item.add_marker(pytest.mark.timeout(seconds + 300))


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: end-to-end fault test (--faults-seconds)")
