"""The declared seam between node/ and cluster/ (node/ownership.py): cluster/ uses a
broker only through ``BrokerSeam``, and the real Broker has all of it."""

from __future__ import annotations

import ast
import inspect
import pathlib

from node.broker import Broker
from node.ownership import BrokerSeam

ROOT = pathlib.Path(__file__).resolve().parents[2]


def declared() -> set[str]:
    names = set(getattr(BrokerSeam, "__annotations__", {}))
    names |= {n for n, v in vars(BrokerSeam).items() if inspect.isfunction(v)}
    return names


def used_in_cluster() -> dict[str, set[str]]:
    """Every ``<something>.broker.<name>`` / ``broker.<name>`` in cluster/ (not the
    simulation, which plays the clients and the server too)."""
    used: dict[str, set[str]] = {}
    for path in sorted((ROOT / "cluster").glob("*.py")):
        if path.name == "simulation.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "broker") or \
                    (isinstance(base, ast.Attribute) and base.attr == "broker"):
                used.setdefault(node.attr, set()).add(path.name)
    return used


def test_cluster_uses_only_the_declared_broker_seam():
    undeclared = {name: files for name, files in used_in_cluster().items()
                  if name not in declared()}
    assert not undeclared, f"cluster/ reaches past BrokerSeam: {undeclared}"


def test_the_broker_has_everything_the_seam_declares():
    missing = [name for name in declared() if not hasattr(Broker, name) and
               name not in Broker.__init__.__code__.co_names]
    assert not missing, missing
