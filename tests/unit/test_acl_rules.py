"""node/acl.py: Mosquitto's ACL file format and the matching rules, checked against a
brute-force oracle over a small topic universe."""

from __future__ import annotations

import itertools

import pytest

from node.acl import Acl, AclFileError, covers, matches, overlaps

LEVELS = ("a", "b", "$s")
# every topic name of 1 to 3 levels over LEVELS
TOPICS = [t for n in (1, 2, 3) for t in itertools.product(LEVELS, repeat=n)]
# filters of 1 to 3 levels over LEVELS, + and (last) #
FILTERS = [f for n in (1, 2, 3) for f in itertools.product(LEVELS + ("+", "#"), repeat=n)
           if "#" not in f[:-1]]


def test_matches_agrees_with_mqtt_matching():
    def oracle(rule, topic):
        if rule[0] in ("+", "#") and topic[0].startswith("$"):
            return False
        for i, level in enumerate(rule):
            if level == "#":
                return True
            if i >= len(topic) or (level != "+" and level != topic[i]):
                return False
        return len(rule) == len(topic)
    for rule in FILTERS:
        for topic in TOPICS:
            assert matches(rule, topic) == oracle(rule, topic), (rule, topic)


def test_covers_and_overlaps_agree_with_the_topics_they_match():
    # (over this universe, a topic one level longer stands for "anything deeper")
    universe = TOPICS + [t for t in itertools.product(LEVELS, repeat=4)]
    matched = {f: {t for t in universe if matches(f, t)} for f in FILTERS}
    for rule in FILTERS:
        for filt in FILTERS:
            assert covers(rule, filt) == (matched[filt] <= matched[rule]), (rule, filt)
            assert overlaps(rule, filt) == bool(matched[filt] & matched[rule]), (rule, filt)


ACL = """
topic read public/#
user alice
topic readwrite alice/#
topic deny alice/secret/#
pattern write devices/%c/up
pattern read inbox/%u
"""


def test_rights_per_user_pattern_and_anonymous():
    acl = Acl.parse(ACL)
    alice = acl.rights("alice", "dev1")
    assert alice.may_publish("alice/x") and not alice.may_publish("alice/secret/k")
    assert alice.may_subscribe("alice/+") and not alice.may_subscribe("alice/secret/#")
    assert alice.may_subscribe("alice/#") and not alice.may_read("alice/secret/k")
    assert alice.may_publish("devices/dev1/up") and not alice.may_publish("devices/dev2/up")
    assert alice.may_subscribe("inbox/alice") and not alice.may_subscribe("inbox/bob")
    anon = acl.rights(None, "dev9")
    assert anon.may_subscribe("public/#") and not anon.may_publish("public/x")
    assert not anon.may_subscribe("inbox/+")  # (%u never applies without a username)
    assert anon.may_publish("devices/dev9/up")
    stranger = acl.rights("mallory", "m")
    assert not stranger.may_subscribe("public/#")  # (anonymous rules: anonymous only)
    assert acl.has_deny


@pytest.mark.parametrize("client_id", ["#", "+", "a/b"])
def test_a_client_id_with_wildcards_or_slashes_gets_no_pattern_rule(client_id):
    acl = Acl.parse("pattern readwrite devices/%c/#\n")
    rights = acl.rights(None, client_id)
    assert not rights.may_subscribe("devices/#") and not rights.may_subscribe("devices/+/x")
    assert not rights.may_publish("devices/x/y")


@pytest.mark.parametrize("line, words", [
    ("topic read a/#/b", "`#` must be a whole level"),
    ("topic read a/b+", "`+` must be a whole level"),
    ("topic read devices/%c", "only in `pattern`"),
    ("pattern read devices/x%c", "whole level"),
    ("user", "needs a username"),
    ("topic sideways x", "not read, write, readwrite or deny"),
    ("allow everything", "expected `user`"),
])
def test_bad_lines_are_refused_with_their_number(line, words):
    with pytest.raises(AclFileError, match=r"line 2") as err:
        Acl.parse(f"# header\n{line}\n")
    assert words in str(err.value)


def test_a_topic_with_a_space_after_the_access_word():
    acl = Acl.parse("topic write my topic/x\n")
    assert acl.rights(None, "c").may_publish("my topic/x")
