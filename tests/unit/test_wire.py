"""The compact forwarded-message encoding round-trips every field."""

from node.mqtt.codes import PropertyId as P
from node.session.message import Message

from cluster.wire import pack_forward, unpack_forward


def test_plain_message_round_trip():
    m = Message("a/b", b"\x00payload\xff", 1, False, None, None, "pub-1")
    got, normal, groups = unpack_forward(pack_forward(m, True, None))
    assert (got.topic, got.payload, got.qos, got.retain, got.properties, got.expires_at,
            got.origin) == ("a/b", b"\x00payload\xff", 1, False, None, None, "pub-1")
    assert normal is True and groups is None


def test_properties_expiry_groups_and_unicode_round_trip():
    props = {P.USER_PROPERTY: [("k", "v"), ("k", "w")], P.CORRELATION_DATA: b"\x01\x02",
             P.RESPONSE_TOPIC: "r/é", P.PAYLOAD_FORMAT_INDICATOR: 1}
    m = Message("t/ü/€", b"", 2, True, props, 2_000_000_000.25, "")
    got, normal, groups = unpack_forward(pack_forward(m, False, ["$share/g/t/#", "$share/h/#"]))
    assert got.topic == "t/ü/€" and got.payload == b"" and got.qos == 2 and got.retain
    assert got.properties == props and got.expires_at == 2_000_000_000.25 and got.origin == ""
    assert normal is False and groups == ["$share/g/t/#", "$share/h/#"]
