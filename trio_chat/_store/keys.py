"""Redis key and channel names (SPEC §3, §4), in the one place that spells them."""

from __future__ import annotations

import binascii

INSTANCES = "ws:instances"
#: the operators' room index (SPEC §15): room id -> distinct users present
ROOMS = "ws:rooms"
LOGOUT_CHANNEL = "auth:logout"
CHANGED_CHANNEL = "auth:changed"
ROOM_CHANNEL_PREFIX = "chat:room:"
CONTROL_CHANNEL_PREFIX = "ws:control:"
#: hash slots of a Redis Cluster
SLOTS = 16384


def auth(user_id: str) -> str:
    return f"auth:{user_id}"


def user_sessions(user_id: str) -> str:
    return f"ws:user:{user_id}"


def session(session_id: str) -> str:
    return f"ws:session:{session_id}"


def room_presence(room: str) -> str:
    return f"ws:room:{room}"


def room_users(room: str) -> str:
    return f"ws:room:{room}:users"


def read_markers(room: str) -> str:
    return f"ws:read:{room}"


def instance(instance_id: str) -> str:
    return f"ws:instance:{instance_id}"


def instance_sessions(instance_id: str) -> str:
    return f"ws:instance:{instance_id}:sessions"


def instance_rooms(instance_id: str) -> str:
    return f"ws:instance:{instance_id}:rooms"


def reap_lock(instance_id: str) -> str:
    return f"ws:reap:{instance_id}"


def room_channel(room: str) -> str:
    return f"{ROOM_CHANNEL_PREFIX}{room}"


def control_channel(instance_id: str) -> str:
    return f"{CONTROL_CHANNEL_PREFIX}{instance_id}"


def is_shard_channel(channel: str) -> bool:
    """On a Redis Cluster, a shard channel (SPEC §12): carried only by its slot's shard."""
    return channel.startswith((ROOM_CHANNEL_PREFIX, CONTROL_CHANNEL_PREFIX))


def hash_slot(name: str) -> int:
    """The Redis Cluster slot of a key or shard channel: CRC16 (XMODEM) of its hash tag, or of
    the whole name when it has none, modulo 16384."""
    data = name.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS
