"""What the admin operations read and write in the store (SPEC §3, §4, §9), without HTTP.

Each function is one operator action; the admin API (``_web.admin``) and any future caller map
their results and errors (:class:`BackendUnavailable`, :class:`NoRecord`) onto a transport.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from ._errors import BackendUnavailable, ChatError
from ._messages import JSONValue, dumps, now_ms, room_message
from ._registry import session_rooms
from ._store import keys
from ._store.cluster import ClusterBackend
from ._store.history import ID_BYTES, parse_id, stored
from ._store.history import publish as publish_message
from ._store.interface import Batch

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._config import Config, HistoryConfig
    from ._hub import Hub
    from ._store.interface import Backend

logger = logging.getLogger(__name__)


class NoRecord(ChatError):
    """``auth.require_record`` is on and the user has no ``auth:<uid>`` to change."""


class PayloadTooLarge(ChatError):
    """The Pub/Sub payload would exceed ``limits.max_message_bytes``: recipients refuse it."""


async def publish(backend: Backend, config: Config, room: str, data: JSONValue) -> tuple[str, int]:
    """PUBLISH a room message shaped as a client's (SPEC §4), with ``from`` and ``session``
    null: it comes from no user.

    Returns:
        The message's ``(id, ts)``, as recipients see them.

    Raises:
        PayloadTooLarge: the payload is over ``limits.max_message_bytes``.
        BackendUnavailable: the store could not be reached.
    """
    ts, message = room_message(room, None, None, data)
    if len(message.encode()) + ID_BYTES > config.limits.max_message_bytes:
        raise PayloadTooLarge(f"message over {config.limits.max_message_bytes} bytes")
    batch = Batch()
    reply = publish_message(batch, config.history, room, message)
    await backend.execute(batch)
    message_id = reply.value
    logger.info("admin published %s to room %s", message_id, room)
    return message_id, ts


async def logout(hub: Hub, user_id: str) -> int:
    """Revoke every token of ``user_id`` issued so far, then close its sessions everywhere.

    Sets ``not_before`` to the current second rounded up (tokens issued before it are refused).
    With ``auth.require_record`` a missing record already means "not logged in", so the record
    is deleted instead (SPEC §3): a record holding only ``not_before`` would let new tokens in.

    Returns:
        The sessions closed, as acknowledged by every instance within a second.

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    batch = Batch()
    if hub.config.auth.require_record:
        batch.delete(keys.auth(user_id))
    else:
        batch.hset(keys.auth(user_id), {"not_before": str(math.ceil(time.time()))})
    await hub.backend.execute(batch)
    closed = await hub.logout(user_id, "logout")
    logger.info("admin logged out user %s: %d session(s) closed", user_id, closed)
    return closed


async def ban(hub: Hub, user_id: str) -> int:
    """Mark ``user_id`` banned (handshakes are refused 403), then close its sessions (4403).

    Returns:
        The sessions closed, as acknowledged by every instance within a second.

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    batch = Batch()
    batch.hset(keys.auth(user_id), {"status": "banned"})
    await hub.backend.execute(batch)
    closed = await hub.logout(user_id, "banned")
    logger.info("admin banned user %s: %d session(s) closed", user_id, closed)
    return closed


async def unban(hub: Hub, user_id: str) -> None:
    """Mark ``user_id`` active again and tell every instance to drop its cached record.

    Raises:
        NoRecord: ``auth.require_record`` is on and the user has no record.
        BackendUnavailable: the store could not be reached.
    """
    await _change_record(hub, user_id, {"status": "active"})
    logger.info("admin unbanned user %s", user_id)


async def mute(hub: Hub, user_id: str, seconds: float) -> int:
    """Refuse ``user_id``'s sends for ``seconds`` and tell every instance at once.

    Returns:
        ``muted_until``, unix seconds (rounded up).

    Raises:
        NoRecord: ``auth.require_record`` is on and the user has no record.
        BackendUnavailable: the store could not be reached.
    """
    until = math.ceil(time.time() + seconds)
    await _change_record(hub, user_id, {"muted_until": str(until)})
    logger.info("admin muted user %s until %d", user_id, until)
    return until


async def _change_record(hub: Hub, user_id: str, fields: Mapping[str, str]) -> None:
    """HSET ``auth:<uid>`` and PUBLISH ``auth:changed``.

    With ``auth.require_record`` an absent record means "not logged in", and creating one would
    let the user in; so only an existing record is changed there. (EXISTS then HSET is not
    atomic: a record deleted in between is written again. Atomicity needs a script.)
    """
    key = keys.auth(user_id)
    if hub.config.auth.require_record:
        check = Batch()
        exists = check.exists(key)
        await hub.backend.execute(check)
        if not exists.value:
            raise NoRecord(f"user {user_id!r} has no auth record")
    batch = Batch()
    batch.hset(key, fields)
    batch.publish(keys.CHANGED_CHANNEL, dumps({"user_id": user_id}))
    await hub.backend.execute(batch)


async def user_sessions(backend: Backend, user_id: str) -> list[dict[str, object]]:
    """The live sessions of ``user_id`` (``ws:user:<uid>`` members whose hash still exists).

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    lookup = Batch()
    members = lookup.smembers(keys.user_sessions(user_id))
    await backend.execute(lookup)
    batch = Batch()
    hashes = {sid: batch.hgetall(keys.session(sid)) for sid in sorted(members.value)}
    if hashes:
        await backend.execute(batch)
    return [_session_view(sid, reply.value) for sid, reply in hashes.items() if reply.value]


def _session_view(session_id: str, fields: Mapping[str, str]) -> dict[str, object]:
    """A ``ws:session`` hash with its numbers and room list decoded (SPEC §3)."""
    return {
        "session_id": session_id,
        "user_id": fields.get("user_id", ""),
        "instance": fields.get("instance", ""),
        "connected_at": _int(fields.get("connected_at")),
        "last_seen": _int(fields.get("last_seen")),
        "rooms": session_rooms(fields.get("rooms")),
        "token_exp": _int(fields.get("token_exp")),
        "remote": fields.get("remote", ""),
    }


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


async def kick(hub: Hub, session_id: str) -> int | None:
    """Close one session, wherever it is (``logout {reason: "kicked"}``, 4000).

    Returns:
        The sessions closed (0 or 1), or None when ``ws:session:<sid>`` does not exist.

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    batch = Batch()
    user_id = batch.hget(keys.session(session_id), "user_id")
    await hub.backend.execute(batch)
    if not user_id.value:
        return None
    closed = await hub.logout(user_id.value, "kicked", session_id=session_id)
    logger.info("admin kicked session %s of user %s: %d closed", session_id, user_id.value, closed)
    return closed


async def room_history(
    backend: Backend, history: HistoryConfig, room: str, before: str | None, limit: int
) -> tuple[list[dict[str, object]], bool]:
    """A page of the room's history (SPEC §11): up to ``limit`` messages older than
    ``before`` (the latest when None), oldest first, and whether older ones remain.

    Raises:
        ValueError: ``before`` is not a message id.
        BackendUnavailable: the store could not be reached.
    """
    if not history.size:
        return [], False
    if before is not None and parse_id(before) is None:
        raise ValueError("'before' must be a message id")
    batch = Batch()
    end = "+" if before is None else f"({before}"
    newest = batch.xrevrange(keys.room_channel(room), end, "-", limit + 1)
    await backend.execute(batch)
    messages = [
        {"id": m["id"], "room": room, "from": m["from"], "data": m["data"], "ts": m["ts"]}
        for m in stored(reversed(newest.value[:limit]))
    ]
    return messages, len(newest.value) > limit


async def room_presence(backend: Backend, config: Config, room: str) -> list[dict[str, str]]:
    """The sessions present in ``room``: a heartbeat within ``session.ttl`` and a live record.

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    lookup = Batch()
    since = now_ms() - config.session.ttl * 1000
    members = lookup.zrangebyscore(keys.room_presence(room), since, math.inf)
    await backend.execute(lookup)
    batch = Batch()
    users = {sid: batch.hget(keys.session(sid), "user_id") for sid in members.value}
    if users:
        await backend.execute(batch)
    return [{"session_id": sid, "user_id": user.value} for sid, user in users.items() if user.value]


async def instances(backend: Backend) -> list[dict[str, object]]:
    """Every member of ``ws:instances`` with its record; ``alive`` is whether the record
    (renewed every ``session.instance_ttl / 3``) still exists, ``sessions`` how many sessions
    it holds (those of a dead instance until it is reaped).

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    lookup = Batch()
    members = lookup.smembers(keys.INSTANCES)
    await backend.execute(lookup)
    batch = Batch()
    ids = sorted(members.value)
    records = {iid: batch.hgetall(keys.instance(iid)) for iid in ids}
    sessions = {iid: batch.hlen(keys.instance_sessions(iid)) for iid in ids}
    if records:
        await backend.execute(batch)
    return [
        {
            "instance_id": iid,
            "alive": bool(record.value),
            "host": record.value.get("host"),
            "pid": _int(record.value.get("pid")),
            "port": _int(record.value.get("port")),
            "started_at": _int(record.value.get("started_at")),
            "sessions": sessions[iid].value,
        }
        for iid, record in records.items()
    ]


async def readiness(hub: Hub) -> tuple[list[str], dict[str, object] | None]:
    """Why this instance should not get new clients (empty when it is ready), and on a Redis
    Cluster the cluster's state as a master reports it (None elsewhere).

    ``redis_unreachable`` (a cheap EXISTS failed), ``pubsub_stale`` (the pump is reconnecting or
    its probe did not come back), ``cluster_not_ok`` (a master says the cluster is not ``ok``:
    some slot has no master, e.g. during a failover), ``draining`` (shutting down).
    """
    reasons = []
    batch = Batch()
    batch.exists(keys.instance(hub.instance_id))
    try:
        await hub.backend.execute(batch)
    except BackendUnavailable:
        reasons.append("redis_unreachable")
    if not hub.pump_healthy:
        reasons.append("pubsub_stale")
    cluster = None
    if isinstance(hub.backend, ClusterBackend):
        cluster = await hub.backend.state()
        if cluster["state"] != "ok":
            reasons.append("cluster_not_ok")
    if hub.draining:
        reasons.append("draining")
    return reasons, cluster
