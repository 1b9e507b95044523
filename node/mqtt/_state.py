"""The MQTT connection's state machine, server role. All transition logic lives here.

Two sides move independently, as in h11: the *client* (what it may send us) and the
*server* (what we may send). Each table maps a side's state to
``{packet type: that side's next state}``; a packet type missing from the table is
illegal in that state (``ProtocolViolation`` for what we receive, ``LocalMqttError``
for what we send). The connection's public ``state`` is derived from both.

    client: AWAIT_CONNECT --CONNECT--> CONNECTED --DISCONNECT--> CLOSED
    server: AWAIT_CONNECT --CONNACK < 0x80--> CONNECTED --DISCONNECT--> CLOSED
                          --CONNACK >= 0x80--> CLOSED
                          --AUTH--> AWAIT_CONNECT (enhanced authentication, 5.0)

A client may pipeline packets after its CONNECT without waiting for the CONNACK
(3.1.1 section 3.1.4, 5.0 section 3.1.4), so its side is CONNECTED once the CONNECT is
read; whether to act on them before the CONNACK is the caller's choice.
"""

from __future__ import annotations

import enum

from .codes import PacketType as T

__all__ = ["ConnectionState", "CONNACK_REFUSED", "CLIENT_TRANSITIONS",
           "SERVER_TRANSITIONS", "public_state"]


class ConnectionState(enum.Enum):
    AWAIT_CONNECT = "await_connect"
    CONNECTED = "connected"
    CLOSED = "closed"
    ERROR = "error"


S = ConnectionState

#: Pseudo packet type: a CONNACK whose reason code is 0x80 or more (the server closes).
CONNACK_REFUSED = "CONNACK refused"

#: What the client may send, by the client's state.
CLIENT_TRANSITIONS: dict[ConnectionState, dict[int, ConnectionState]] = {
    S.AWAIT_CONNECT: {T.CONNECT: S.CONNECTED},
    S.CONNECTED: {
        T.PUBLISH: S.CONNECTED, T.PUBACK: S.CONNECTED, T.PUBREC: S.CONNECTED,
        T.PUBREL: S.CONNECTED, T.PUBCOMP: S.CONNECTED, T.SUBSCRIBE: S.CONNECTED,
        T.UNSUBSCRIBE: S.CONNECTED, T.PINGREQ: S.CONNECTED, T.AUTH: S.CONNECTED,
        T.DISCONNECT: S.CLOSED,
    },
    S.CLOSED: {},
}

#: What the server may send, by the server's state.
SERVER_TRANSITIONS: dict[ConnectionState, dict[object, ConnectionState]] = {
    S.AWAIT_CONNECT: {
        T.CONNACK: S.CONNECTED, CONNACK_REFUSED: S.CLOSED, T.AUTH: S.AWAIT_CONNECT,
    },
    S.CONNECTED: {
        T.PUBLISH: S.CONNECTED, T.PUBACK: S.CONNECTED, T.PUBREC: S.CONNECTED,
        T.PUBREL: S.CONNECTED, T.PUBCOMP: S.CONNECTED, T.SUBACK: S.CONNECTED,
        T.UNSUBACK: S.CONNECTED, T.PINGRESP: S.CONNECTED, T.AUTH: S.CONNECTED,
        T.DISCONNECT: S.CLOSED,
    },
    S.CLOSED: {},
}

#: Packet types only a server sends: a client sending one breaks the protocol.
SERVER_ONLY = frozenset({T.CONNACK, T.SUBACK, T.UNSUBACK, T.PINGRESP})


def public_state(client: ConnectionState, server: ConnectionState) -> ConnectionState:
    """The connection's state as the caller sees it: CLOSED once either side closed,
    otherwise the server's side (CONNECTED only after a successful CONNACK)."""
    if client is S.CLOSED or server is S.CLOSED:
        return S.CLOSED
    return server
