"""Topic name and filter syntax, including the $share forms."""

from __future__ import annotations

import pytest

from node.mqtt.topic_rules import parse_shared, valid_topic_filter, valid_topic_name


@pytest.mark.parametrize("name", [
    "a", "a/b", "/", "a/", "/a", "//", "$SYS/broker", "$share/g/t", "sport/tennis/player1",
    "ünïcödé/ok", " ", "a b/c",
])
def test_valid_topic_names(name):
    assert valid_topic_name(name)


@pytest.mark.parametrize("name", ["", "+", "#", "a/+", "a/#", "a/b#", "a+/b", "sport/+/x"])
def test_invalid_topic_names(name):
    assert not valid_topic_name(name)


@pytest.mark.parametrize("f", [
    "a", "a/b", "#", "+", "+/+", "a/+/b", "a/#", "+/#", "/#", "/+", "/", "//", "a//#",
    "$SYS/#", "sport/tennis/+", "+/tennis/#",
    "$share/g/a", "$share/g/#", "$share/group-1/+/b/#", "$share/g/+", "$share/g//",
    "$share", "$sharex/a/b", "$shar/e/#",
])
def test_valid_topic_filters(f):
    assert valid_topic_filter(f)


@pytest.mark.parametrize("f", [
    "", "a#", "#/a", "a/#/b", "a/b#", "a+", "+a/b", "a/+b", "a/b+", "##", "++", "a/#/#",
    "$share/", "$share/g", "$share/g/", "$share//a", "$share/g+/a", "$share/g#/a",
    "$share/+/a", "$share/#/a", "$share/g/a#", "$share/g/#/a", "$share/g/a+",
])
def test_invalid_topic_filters(f):
    assert not valid_topic_filter(f)


@pytest.mark.parametrize("f, expected", [
    ("$share/g/a/b", ("g", "a/b")),
    ("$share/grp/#", ("grp", "#")),
    ("$share/g//a", ("g", "/a")),
    ("a/b", (None, "a/b")),
    ("$share", (None, "$share")),
    ("$SHARE/g/a", (None, "$SHARE/g/a")),
    ("#", (None, "#")),
])
def test_parse_shared(f, expected):
    assert parse_shared(f) == expected
