"""The on-disk format of the store: file names, record framing, record types.

Every file of the store (``CURRENT``, ``snapshot-G``, ``log-G``) is a sequence of frames:

    frame = length:u32le | crc:u32le | payload[length]
    crc   = CRC-32 of the 4 length bytes followed by the payload

and every payload is one msgpack array whose first element is the record type (``Op``).
A frame is *intact* when its length fits in the file and its CRC matches; the CRC covers
the length so a flipped bit there is caught like one in the payload.

Records (the same types serve the log and the snapshot, so one ``apply`` replays both):

    HEADER       [0, "shoal-store", FORMAT, kind, generation]   first frame of each file;
                 kind is "log", "snapshot" or "current"; CURRENT also has has_snapshot.
    SESSION      [1, client_id, meta]                 create the session or replace meta
    DROP_SESSION [2, client_id]                       the session and everything in it
    BODY         [3, body_id, record]                 a message body, stored once
    MESSAGE      [4, client_id, key, entry, body_id]  put (or replace) a session's message
    UPDATE       [5, client_id, key, entry]           new entry, same body
    REMOVE       [6, client_id, key]
    IN_ADD       [7, client_id, packet_id]            QoS 2 received, awaiting PUBREL
    IN_REMOVE    [8, client_id, packet_id]
    RETAIN       [9, topic, record | None]            None deletes
    END          [10, record_count]                   last frame of a complete snapshot
"""

from __future__ import annotations

import enum
import re
import struct
import zlib

import msgpack

MAGIC = "shoal-store"
FORMAT = 1
FRAME = struct.Struct("<II")
FRAME_SIZE = FRAME.size
#: A frame longer than this is treated as damage, not allocated (MQTT caps a packet at 256 MiB).
MAX_RECORD = 512 << 20

CURRENT = "CURRENT"
CURRENT_TMP = "CURRENT.tmp"
LOCK = "LOCK"
DAMAGED_DIR = "damaged"
_DATA_FILE = re.compile(r"^(snapshot|log)-(\d{8})$")


class Op(enum.IntEnum):
    HEADER = 0
    SESSION = 1
    DROP_SESSION = 2
    BODY = 3
    MESSAGE = 4
    UPDATE = 5
    REMOVE = 6
    IN_ADD = 7
    IN_REMOVE = 8
    RETAIN = 9
    END = 10


def snapshot_name(gen: int) -> str:
    return f"snapshot-{gen:08d}"


def log_name(gen: int) -> str:
    return f"log-{gen:08d}"


def parse_name(name: str) -> tuple[str, int] | None:
    """("snapshot" | "log", generation) for a data file name, else None."""
    m = _DATA_FILE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


_pack = msgpack.Packer(use_bin_type=True).pack


def pack(record: list) -> bytes:
    return _pack(record)


def unpack(payload) -> list:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)


def frame(payload: bytes) -> bytes:
    head = len(payload).to_bytes(4, "little")
    return FRAME.pack(len(payload), zlib.crc32(payload, zlib.crc32(head))) + payload


def header(kind: str, gen: int, *extra) -> bytes:
    return frame(pack([Op.HEADER, MAGIC, FORMAT, kind, gen, *extra]))


def _intact_at(data, off: int, size: int) -> int:
    """Length of the intact frame at ``off`` (header included), or 0."""
    if off + FRAME_SIZE > size:
        return 0
    length, crc = FRAME.unpack_from(data, off)
    end = off + FRAME_SIZE + length
    if length == 0 or length > MAX_RECORD or end > size:
        return 0
    if zlib.crc32(data[off + FRAME_SIZE:end], zlib.crc32(data[off:off + 4])) != crc:
        return 0
    return FRAME_SIZE + length


def read_frames(data, start: int = 0) -> tuple[list[memoryview], int]:
    """The intact frames from ``start`` up to the first damaged byte, and where they stop
    (``== len(data)`` when the whole rest is intact)."""
    view = memoryview(data)
    size = len(view)
    off = start
    payloads = []
    while off < size:
        n = _intact_at(view, off, size)
        if not n:
            break
        payloads.append(view[off + FRAME_SIZE:off + n])
        off += n
    return payloads, off


def next_intact(data, start: int) -> int:
    """Offset of the first intact frame after damage at ``start``, or ``len(data)``."""
    view = memoryview(data)
    size = len(view)
    off = start + 1
    while off + FRAME_SIZE < size:
        if _intact_at(view, off, size):
            return off
        off += 1
    return size


def count_intact(data, start: int) -> int:
    """How many intact frames follow damage at ``start`` (each run of intact frames after
    each damaged stretch). Zero means a torn or garbage tail; more means damage in the
    middle, and says how many records it cost."""
    view = memoryview(data)
    size = len(view)
    count = 0
    off = next_intact(view, start)
    while off < size:
        n = _intact_at(view, off, size)
        if n:
            count += 1
            off += n
        else:
            off = next_intact(view, off)
    return count
