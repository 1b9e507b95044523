"""Retained messages survive a crash of their node (kill -9, then a restart on the same
--data-dir): the first part of durable state (issue 4) that the broker keeps on disk."""

from __future__ import annotations


import pytest

from support import wait_for

pytestmark = [pytest.mark.timeout(40),
              pytest.mark.shoal_only("Mosquitto runs here with persistence off")]


def crash_and_restart(node) -> None:
    node.kill()  # kill -9: no shutdown, no store flush
    node.start()


def test_retained_set_and_cleared_survive_kill_9(node):
    pub = node.paho("rd-pub", 5)
    pub.publish("rd/kept", b"value-1", qos=1, retain=True)
    pub.publish("rd/kept", b"value-2", qos=1, retain=True)   # replaced
    pub.publish("rd/gone", b"soon-cleared", qos=1, retain=True)
    pub.publish("rd/gone", b"", qos=1, retain=True)          # cleared
    wait_for(lambda: node.stats()["retained"] == 1, 5, message="one retained topic")
    crash_and_restart(node)

    assert node.stats()["retained"] == 1
    sub = node.paho("rd-sub", 5)
    sub.subscribe("rd/#", qos=1)
    got = sub.wait_messages(1, topic="rd/kept")
    assert [(m.payload, m.retain) for m in got] == [(b"value-2", True)]
    assert sub.payloads("rd/gone") == []
