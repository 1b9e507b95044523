"""The one dispatch table: packet class -> handler (Mosquitto's handle__packet).

Handlers see decoded packets only and talk to the connection through the small
``client`` interface of node/server.py. Protocol faults are raised as
``RemoteMqttError`` (with their reason code) and turned into the reply in one place,
``MqttProtocol.data_received``.
"""

from __future__ import annotations

from ..mqtt import packets as p
from .on_connect import (disconnect_during_auth, not_during_auth, on_auth_during_connect,
                         on_connect)
from .on_disconnect import on_auth, on_disconnect, on_pingreq
from .on_publish import on_puback, on_pubcomp, on_publish, on_pubrec, on_pubrel
from .on_subscribe import on_subscribe, on_unsubscribe

HANDLERS = {
    p.Connect: on_connect,
    p.Publish: on_publish,
    p.Puback: on_puback,
    p.Pubrec: on_pubrec,
    p.Pubrel: on_pubrel,
    p.Pubcomp: on_pubcomp,
    p.Subscribe: on_subscribe,
    p.Unsubscribe: on_unsubscribe,
    p.Pingreq: on_pingreq,
    p.Disconnect: on_disconnect,
    p.Auth: on_auth,
}

#: the table while an MQTT 5 enhanced authentication waits for the client's AUTH (before
#: CONNACK): only AUTH and DISCONNECT [MQTT-3.1.2-30]; ``client.enhanced_auth`` switches
AUTHENTICATING = {**{cls: not_during_auth for cls in HANDLERS}, p.Auth: on_auth_during_connect,
                  p.Disconnect: disconnect_during_auth}
