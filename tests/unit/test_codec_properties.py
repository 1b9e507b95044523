"""Property-based round trips: ``decode(encode(p)) == p`` for generated packets of every
type, in 3.1 (level 3), 3.1.1 (4) and 5.0 (5). Only fields the version can carry are
generated (3.1.1 has no properties, no ack reason codes, CONNACK/SUBACK codes with a
3.1.1 form)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from node.mqtt import codec
from node.mqtt._framing import remaining_length
from node.mqtt.codec import CONNACK_311_TO_V5, REASON_CODES
from node.mqtt.codes import (
    ALLOWED_PROPERTIES, PROPERTY_TYPES, WILL, PacketType as T, PropertyId as P,
    PropertyType,
)
from node.mqtt.connection import NEED_DATA, MqttConnection
from node.mqtt.packets import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec,
    Pubrel, Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will,
)

VERSIONS = st.sampled_from([3, 4, 5])

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=12)
topic_name = text.filter(lambda s: s and "+" not in s and "#" not in s)
packet_id = st.integers(1, 0xFFFF)
qos = st.integers(0, 2)
payload = st.binary(max_size=300)


def value_of(pid: P):
    kind = PROPERTY_TYPES[pid]
    if kind is PropertyType.BYTE:
        return st.integers(0, 1)
    if kind is PropertyType.U16:
        lo = 1 if pid in (P.RECEIVE_MAXIMUM, P.TOPIC_ALIAS) else 0
        return st.integers(lo, 0xFFFF)
    if kind is PropertyType.U32:
        return st.integers(1 if pid == P.MAXIMUM_PACKET_SIZE else 0, 0xFFFFFFFF)
    if kind is PropertyType.VARINT:
        return st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3)
    if kind is PropertyType.STRING:
        return text
    if kind is PropertyType.BINARY:
        return st.binary(max_size=20)
    return st.lists(st.tuples(text, text), min_size=1, max_size=3)  # user properties


def properties(packet_type: int):
    allowed = sorted(ALLOWED_PROPERTIES[packet_type])
    if packet_type == T.PUBLISH:
        allowed.remove(P.TOPIC_ALIAS)  # generated with the topic, see publishes()

    @st.composite
    def build(draw):
        chosen = draw(st.lists(st.sampled_from(allowed), unique=True, max_size=4))
        props = {pid: draw(value_of(pid)) for pid in chosen}
        if packet_type == T.SUBSCRIBE and P.SUBSCRIPTION_IDENTIFIER in props:
            props[P.SUBSCRIPTION_IDENTIFIER] = props[P.SUBSCRIPTION_IDENTIFIER][:1]
        if P.AUTHENTICATION_DATA in props and packet_type == T.CONNECT:
            props.setdefault(P.AUTHENTICATION_METHOD, "m")
        return props

    return build()


def props_for(version: int, packet_type: int):
    return properties(packet_type) if version == 5 else st.just({})


def reason_for(version: int, packet_type: int):
    if version != 5:
        return st.just(0)
    return st.sampled_from(sorted(REASON_CODES[packet_type]))


@st.composite
def connects(draw, version):
    will = None
    if draw(st.booleans()):
        will = Will(draw(topic_name), draw(payload), draw(qos), draw(st.booleans()),
                    draw(props_for(version, WILL)))
    username = draw(st.none() | text)
    password = draw(st.none() | st.binary(max_size=20))
    if version != 5 and username is None:
        password = None
    return Connect(draw(text), version, "MQIsdp" if version == 3 else "MQTT",
                   draw(st.booleans()), draw(st.integers(0, 0xFFFF)), username, password,
                   will, draw(props_for(version, T.CONNECT)))


@st.composite
def connacks(draw, version):
    if version == 5:
        rc = draw(reason_for(5, T.CONNACK))
    else:
        rc = draw(st.sampled_from(sorted(CONNACK_311_TO_V5.values())))
    return Connack(draw(st.booleans()) if rc == 0 else False, rc,
                   draw(props_for(version, T.CONNACK)))


@st.composite
def publishes(draw, version):
    q = draw(qos)
    props = draw(props_for(version, T.PUBLISH))
    topic = draw(topic_name)
    if version == 5 and draw(st.booleans()):
        props[P.TOPIC_ALIAS] = draw(st.integers(1, 0xFFFF))
        if draw(st.booleans()):
            topic = ""
    return Publish(topic, draw(payload), q, draw(st.booleans()),
                   draw(st.booleans()) if q else False, draw(packet_id) if q else 0, props)


def acks(cls, packet_type):
    @st.composite
    def build(draw, version):
        return cls(draw(packet_id), draw(reason_for(version, packet_type)),
                   draw(props_for(version, packet_type)))
    return build


@st.composite
def subscribes(draw, version):
    subs = []
    for _ in range(draw(st.integers(1, 4))):
        f = draw(text.filter(bool) | st.sampled_from(["#", "a/+/b", "$share/g/x/#"]))
        if version == 5:
            no_local = draw(st.booleans()) and not f.startswith("$share/")
            subs.append(Subscription(f, draw(qos), no_local, draw(st.booleans()),
                                     draw(st.integers(0, 2))))
        else:
            subs.append(Subscription(f, draw(qos)))
    return Subscribe(draw(packet_id), tuple(subs), draw(props_for(version, T.SUBSCRIBE)))


@st.composite
def subacks(draw, version):
    codes = st.sampled_from(sorted(REASON_CODES[T.SUBACK])) if version == 5 \
        else st.sampled_from([0, 1, 2, 0x80])
    return Suback(draw(packet_id), tuple(draw(st.lists(codes, min_size=1, max_size=5))),
                  draw(props_for(version, T.SUBACK)))


@st.composite
def unsubscribes(draw, version):
    return Unsubscribe(draw(packet_id), tuple(draw(st.lists(text, min_size=1, max_size=4))),
                       draw(props_for(version, T.UNSUBSCRIBE)))


@st.composite
def unsubacks(draw, version):
    if version != 5:
        return Unsuback(draw(packet_id))
    codes = st.sampled_from(sorted(REASON_CODES[T.UNSUBACK]))
    return Unsuback(draw(packet_id), tuple(draw(st.lists(codes, min_size=1, max_size=5))),
                    draw(properties(T.UNSUBACK)))


@st.composite
def disconnects(draw, version):
    return Disconnect(draw(reason_for(version, T.DISCONNECT)),
                      draw(props_for(version, T.DISCONNECT)))


@st.composite
def auths(draw, version):
    return Auth(draw(reason_for(5, T.AUTH)), draw(properties(T.AUTH)))


BUILDERS = [
    connects, connacks, publishes, acks(Puback, T.PUBACK), acks(Pubrec, T.PUBREC),
    acks(Pubrel, T.PUBREL), acks(Pubcomp, T.PUBCOMP), subscribes, subacks, unsubscribes,
    unsubacks, lambda v: st.just(Pingreq()), lambda v: st.just(Pingresp()), disconnects,
]


@st.composite
def packets(draw):
    version = draw(VERSIONS)
    builders = BUILDERS + [auths] if version == 5 else BUILDERS
    return version, draw(draw(st.sampled_from(builders))(version))


def roundtrip(packet, version):
    frame = codec.encode(packet, version)
    rl, start = remaining_length(frame, 1, len(frame))
    assert start + rl == len(frame)
    return frame, codec.decode(frame[0], frame[start:], version)


@settings(max_examples=3000, deadline=None)
@given(packets())
def test_decode_of_encode_is_identity(vp):
    version, packet = vp
    frame, decoded = roundtrip(packet, version)
    assert decoded == packet
    assert type(decoded) is type(packet)
    assert codec.encode(decoded, version) == frame


@settings(max_examples=300, deadline=None)
@given(VERSIONS, st.lists(st.one_of(*(b(5) for b in BUILDERS[2:8] + BUILDERS[11:12])),
                          max_size=8), st.randoms(use_true_random=False))
def test_connection_reads_any_chunking_of_an_encoded_stream(version, pkts, rnd):
    # Client->server packets of the version (generated for 5.0, re-encoded for the
    # version): whole, in random splits and byte by byte give the same packets.
    pkts = [p for p in pkts if not (isinstance(p, Publish) and (
        P.TOPIC_ALIAS in p.properties or P.SUBSCRIPTION_IDENTIFIER in p.properties))]
    connect = Connect("c", version, "MQIsdp" if version == 3 else "MQTT")
    stream = codec.encode(connect, version) + b"".join(codec.encode(p, version) for p in pkts)
    expected = [connect] + [codec.decode(*_split(codec.encode(p, version)), version)
                            for p in pkts]

    def feed(chunks):
        conn = MqttConnection()
        out = []
        for c in chunks:
            conn.receive_data(c)
            while (p := conn.next_packet()) is not NEED_DATA:
                out.append(p)
        return out

    cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1, rnd.randint(0, 10))))
    random_chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    assert feed([stream]) == expected
    assert feed(random_chunks) == expected
    assert feed([stream[i:i + 1] for i in range(len(stream))]) == expected


def _split(frame):
    rl, start = remaining_length(frame, 1, len(frame))
    return frame[0], frame[start:]
