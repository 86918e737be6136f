"""Redis key and channel names (SPEC §3, §4), in the one place that spells them."""

from __future__ import annotations

INSTANCES = "ws:instances"
LOGOUT_CHANNEL = "auth:logout"
CHANGED_CHANNEL = "auth:changed"
ROOM_CHANNEL_PREFIX = "chat:room:"
CONTROL_CHANNEL_PREFIX = "ws:control:"


def auth(user_id: str) -> str:
    return f"auth:{user_id}"


def user_sessions(user_id: str) -> str:
    return f"ws:user:{user_id}"


def session(session_id: str) -> str:
    return f"ws:session:{session_id}"


def room_presence(room: str) -> str:
    return f"ws:room:{room}"


def instance(instance_id: str) -> str:
    return f"ws:instance:{instance_id}"


def instance_sessions(instance_id: str) -> str:
    return f"ws:instance:{instance_id}:sessions"


def reap_lock(instance_id: str) -> str:
    return f"ws:reap:{instance_id}"


def room_channel(room: str) -> str:
    return f"{ROOM_CHANNEL_PREFIX}{room}"


def control_channel(instance_id: str) -> str:
    return f"{CONTROL_CHANNEL_PREFIX}{instance_id}"
