"""Acceptance with the Mosquitto command-line clients (mosquitto_pub / mosquitto_sub)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time

import pytest

from support import wait_for

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not (shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub"))
                       and not os.environ.get("CI"), reason="mosquitto-clients not installed"),
]


class Sub:
    """mosquitto_sub as a child process; its output lines arrive on a queue."""

    def __init__(self, node, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-h", node.host, "-p", str(node.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 5.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"mosquitto_sub printed nothing for {timeout}s") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def pub(node, *args: str, stdin: str | None = None) -> None:
    result = subprocess.run(
        ["mosquitto_pub", "-h", node.host, "-p", str(node.port), *args],
        input=stdin, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"mosquitto_pub {args}: {result.stderr}"


def wait_subscribed(node, sub: Sub, version_flag: str, probe_topic: str) -> None:
    """Publish QoS 0 probes until the subscriber prints one: it is subscribed then.
    QoS 0 is not queued for offline sessions, so no probe is left behind."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pub(node, "-V", version_flag, "-q", "0", "-t", probe_topic, "-m", "probe")
        try:
            line = sub.lines.get(timeout=0.3)
        except queue.Empty:
            continue
        assert line.endswith("probe"), line
        return
    raise AssertionError(f"mosquitto_sub never got a probe: {sub.proc.stderr.read()}")


@pytest.mark.timeout(90)
def test_persistent_mosquitto_sub_gets_all_100_messages_published_while_away(node):
    first = Sub(node, "-V", "mqttv5", "-c", "-i", "s1", "-x", "3600", "-q", "2", "-t", "a/#")
    try:
        wait_subscribed(node, first, "mqttv5", "a/probe")
    finally:
        first.stop()
    if node.has_admin:
        wait_for(lambda: node.stats()["connections"] == 0, 5,
                 message="the subscriber's connection to close")

    lines = "\n".join(str(i) for i in range(100)) + "\n"
    pub(node, "-V", "mqttv5", "-q", "1", "-t", "a/b", "-l", stdin=lines)

    result = subprocess.run(
        ["mosquitto_sub", "-h", node.host, "-p", str(node.port), "-V", "mqttv5", "-c",
         "-i", "s1", "-x", "3600", "-q", "2", "-t", "a/#", "-C", "100", "-W", "20"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"rc={result.returncode} stderr={result.stderr!r}"
    assert result.stdout.splitlines() == [str(i) for i in range(100)]


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_311_clients_publish_and_subscribe(node, qos):
    sub = Sub(node, "-V", "mqttv311", "-q", "2", "-v", "-t", "b/#")
    try:
        wait_subscribed(node, sub, "mqttv311", "b/probe")
        for i in range(3):
            pub(node, "-V", "mqttv311", "-q", str(qos), "-t", f"b/{i}", "-m", f"msg{i}")
        got = []
        for _ in range(20):
            line = sub.line()
            if not line.startswith("b/probe"):
                got.append(line)
            if len(got) == 3:
                break
        assert got == ["b/0 msg0", "b/1 msg1", "b/2 msg2"]
    finally:
        sub.stop()


def test_mosquitto_retained_message_with_311_and_v5_clients(node):
    pub(node, "-V", "mqttv311", "-q", "1", "-r", "-t", "c/state", "-m", "on")
    for version in ("mqttv311", "mqttv5"):
        result = subprocess.run(
            ["mosquitto_sub", "-h", node.host, "-p", str(node.port), "-V", version,
             "-t", "c/#", "-C", "1", "-W", "5", "-v"],
            capture_output=True, text=True, timeout=15)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "c/state on"
