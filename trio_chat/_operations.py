"""What the admin operations read and write in the store (SPEC §3, §4, §9, §14), without HTTP.

:class:`Operator` is the one code path of every operator action: the admin API
(``_web.admin``) and the embedding API (:class:`trio_chat.Server`) both call it, and map its
results and errors (:class:`InvalidArgument`, :class:`BackendUnavailable`, :class:`NoRecord`,
:class:`PayloadTooLarge`) onto their transport. Its answers are what the admin API's JSON
bodies hold.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from ._errors import BackendUnavailable, ChatError
from ._messages import (
    DEFAULT_HISTORY_PAGE,
    MAX_HISTORY_PAGE,
    ROOM_ID,
    JSONValue,
    dumps,
    is_user_id,
    loads,
    new_message_id,
    now_ms,
    room_message,
)
from ._registry import session_rooms
from ._store import keys
from ._store.cluster import ClusterBackend
from ._store.history import ID_BYTES, parse_id, stored
from ._store.history import publish as publish_message
from ._store.interface import Batch

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from contextlib import AbstractAsyncContextManager

    from ._config import Config, HistoryConfig
    from ._hub import Hub
    from ._store.interface import Backend

logger = logging.getLogger(__name__)


class NoRecord(ChatError):
    """``auth.require_record`` is on and the user has no ``auth:<uid>`` to change."""


class PayloadTooLarge(ChatError):
    """The Pub/Sub payload would exceed ``limits.max_message_bytes``: recipients refuse it."""


class InvalidArgument(ChatError, ValueError):
    """An argument of an operation is not valid (a room id, a user id, a number out of range)."""


#: the longest mute, in seconds (a year)
MAX_MUTE_SECONDS = 365 * 86400
#: ``GET /v1/rooms``: the most rooms listed, and the default
MAX_ROOMS_PAGE = 1000
DEFAULT_ROOMS_PAGE = 100


class Operator:
    """The operator actions of one instance (SPEC §9, §14), checked, with JSON-shaped answers.

    Args:
        hub: the instance's hub (its store, its configuration, cross-instance logouts).
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    @property
    def _config(self) -> Config:
        return self._hub.config

    async def publish(
        self, room: object, data: JSONValue, *, sender: object = None
    ) -> dict[str, JSONValue]:
        """A room message from the server (``sender`` None: from no user), as clients'.

        Returns:
            ``{"id", "ts"}`` of the message.
        """
        room = _room(room)
        message_id, ts = await publish(
            self._hub.backend,
            self._config,
            self._hub.rooms(room).history,
            room,
            data,
            sender=_sender(sender),
        )
        return {"id": message_id, "ts": ts}

    async def direct(
        self, user: str, data: JSONValue, *, sender: object = None
    ) -> dict[str, JSONValue]:
        """A ``direct`` to every session of ``user``, from the server (or ``sender``).

        Returns:
            ``{"id", "ts"}`` of the message.
        """
        message_id, ts = new_message_id(), now_ms()
        payload = direct_payload(message_id, _user(user), _sender(sender), None, data, ts)
        if len(payload.encode()) > self._config.limits.max_message_bytes:
            raise PayloadTooLarge(f"message over {self._config.limits.max_message_bytes} bytes")
        await route_direct(self._hub.backend, user, payload)
        logger.info("server sent direct %s to user %s", message_id, user)
        return {"id": message_id, "ts": ts}

    async def logout(self, user: str) -> dict[str, JSONValue]:
        _user(user)
        return {"closed": await logout(self._hub, user)}

    async def ban(self, user: str) -> dict[str, JSONValue]:
        _user(user)
        return {"closed": await ban(self._hub, user)}

    async def unban(self, user: str) -> dict[str, JSONValue]:
        _user(user)
        await unban(self._hub, user)
        return {"user_id": user, "status": "active"}

    async def mute(self, user: str, seconds: object) -> dict[str, JSONValue]:
        _user(user)
        if (
            not isinstance(seconds, int | float)
            or isinstance(seconds, bool)
            or not 0 < seconds <= MAX_MUTE_SECONDS
        ):
            raise InvalidArgument(f"'seconds' must be a number in (0, {MAX_MUTE_SECONDS}]")
        return {"muted_until": await mute(self._hub, user, float(seconds))}

    async def sessions(self, user: str) -> dict[str, JSONValue]:
        _user(user)
        return {"sessions": await user_sessions(self._hub.backend, user)}

    async def kick(self, session_id: str) -> dict[str, JSONValue] | None:
        """Returns ``{"closed"}``, or None when there is no such session."""
        closed = await kick(self._hub, session_id)
        return None if closed is None else {"closed": closed}

    async def presence(self, room: str) -> dict[str, JSONValue]:
        _room(room)
        sessions = await room_presence(self._hub.backend, self._config, room)
        users = sorted({str(s["user_id"]) for s in sessions})
        return {"room": room, "sessions": sessions, "users": users}

    async def history(
        self, room: str, *, before: str | None = None, limit: int = DEFAULT_HISTORY_PAGE
    ) -> dict[str, JSONValue]:
        _room(room)
        if (
            not isinstance(limit, int)
            or isinstance(limit, bool)
            or not 0 < limit <= MAX_HISTORY_PAGE
        ):
            raise InvalidArgument(f"'limit' must be an integer in 1-{MAX_HISTORY_PAGE}")
        try:
            messages, more = await room_history(
                self._hub.backend, self._hub.rooms(room).history, room, before, limit
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return {"room": room, "messages": messages, "more": more}

    async def instances(self) -> dict[str, JSONValue]:
        return {"instances": await instances(self._hub.backend)}

    async def rooms(self, limit: object = DEFAULT_ROOMS_PAGE) -> dict[str, JSONValue]:
        """The rooms with at least one live member, most users first (SPEC §15)."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_ROOMS_PAGE:
            raise InvalidArgument(f"'limit' must be an integer in 1-{MAX_ROOMS_PAGE}")
        return {"rooms": await rooms_index(self._hub.backend, limit)}

    def listen(self, room: str) -> AbstractAsyncContextManager[AsyncIterator[dict[str, object]]]:
        """The room's messages as this instance hands them out (:meth:`Hub.listen`)."""
        return self._hub.listen(_room(room))


def _room(room: object) -> str:
    if not isinstance(room, str) or not ROOM_ID.fullmatch(room):
        raise InvalidArgument("'room' must be 1-128 chars of [A-Za-z0-9_.:-]")
    return room


def _user(user: object) -> str:
    if not isinstance(user, str) or not is_user_id(user):
        raise InvalidArgument("a user id must be 1-256 bytes of UTF-8 without control characters")
    return user


def _sender(sender: object) -> str | None:
    if sender is not None and (not isinstance(sender, str) or not is_user_id(sender)):
        raise InvalidArgument("'from' must be a user id (or null)")
    return sender


def direct_payload(
    message_id: str, to: str, sender: str | None, session_id: str | None, data: JSONValue, ts: int
) -> str:
    """The ``ws:control`` payload of a direct message (SPEC §4): ids and data, never a token."""
    return dumps(
        {
            "type": "direct",
            "id": message_id,
            "to": to,
            "from": sender,
            "session": session_id,
            "data": data,
            "ts": ts,
        }
    )


async def route_direct(backend: Backend, to: str, payload: str) -> None:
    """PUBLISH a direct message to the instances that hold ``to``'s sessions, and no other.

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    lookup = Batch()
    session_ids = lookup.smembers(keys.user_sessions(to))
    await backend.execute(lookup)
    where = Batch()
    owners = [where.hget(keys.session(s), "instance") for s in sorted(session_ids.value)]
    if owners:
        await backend.execute(where)
    instances = {owner.value for owner in owners if owner.value}
    if instances:
        publish = Batch()
        for instance_id in sorted(instances):
            publish.publish(keys.control_channel(instance_id), payload)
        await backend.execute(publish)


async def publish(
    backend: Backend,
    config: Config,
    history: HistoryConfig,
    room: str,
    data: JSONValue,
    *,
    sender: str | None = None,
) -> tuple[str, int]:
    """PUBLISH a room message shaped as a client's (SPEC §4), with ``session`` null, and
    ``from`` the ``sender`` (None: it comes from no user).

    Returns:
        The message's ``(id, ts)``, as recipients see them.

    Raises:
        PayloadTooLarge: the payload is over ``limits.max_message_bytes``.
        BackendUnavailable: the store could not be reached.
    """
    ts, message = room_message(room, sender, None, data)
    if len(message.encode()) + ID_BYTES > config.limits.max_message_bytes:
        raise PayloadTooLarge(f"message over {config.limits.max_message_bytes} bytes")
    batch = Batch()
    reply = publish_message(batch, history, room, message)
    await backend.execute(batch)
    message_id = reply.value
    logger.info("server published %s to room %s", message_id, room)
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


async def room_presence(
    backend: Backend, config: Config, room: str, *, limit: int | None = None
) -> list[dict[str, object]]:
    """The sessions present in ``room``: a heartbeat within ``session.ttl`` and a live record,
    with the ``info`` the connect hook gave each (None without one); the records of at most
    ``limit`` sessions are read, when given.

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    lookup = Batch()
    since = now_ms() - config.session.ttl * 1000
    members = lookup.zrangebyscore(keys.room_presence(room), since, math.inf)
    await backend.execute(lookup)
    batch = Batch()
    found = {
        sid: (batch.hget(keys.session(sid), "user_id"), batch.hget(keys.session(sid), "info"))
        for sid in members.value[:limit]
    }
    if found:
        await backend.execute(batch)
    return [
        {"session_id": sid, "user_id": user.value, "info": _json_object(info.value)}
        for sid, (user, info) in found.items()
        if user.value
    ]


#: users a ``presence`` answer lists at most (SPEC §15)
MAX_PRESENCE_USERS = 1000


async def room_users(
    backend: Backend, config: Config, room: str
) -> tuple[list[dict[str, object]], int]:
    """The users present in ``room`` on any instance (SPEC §15): at most
    :data:`MAX_PRESENCE_USERS` of them, any ones, each with their number of sessions there and
    the ``info`` of one of those (None without one); and how many users there are.

    The users and their counts come from ``ws:room:<room>:users`` (a dead instance's users
    count until it is reaped); ``info`` from the records of the room's live sessions.

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    lookup = Batch()
    counts = lookup.hrandfield(keys.room_users(room), MAX_PRESENCE_USERS)
    total = lookup.hlen(keys.room_users(room))
    await backend.execute(lookup)
    infos: dict[str, dict[str, object]] = {}
    # (the records of at most twice as many sessions as users listed: a big room's presence
    # costs a bounded number of commands; users beyond them get no info)
    for session in await room_presence(backend, config, room, limit=2 * MAX_PRESENCE_USERS):
        user, info = session["user_id"], session["info"]
        if isinstance(user, str) and user in counts.value and isinstance(info, dict):
            infos.setdefault(user, info)
    users: list[dict[str, object]] = [
        {"user": user, "info": infos.get(user), "sessions": _int(sessions) or 0}
        for user, sessions in sorted(counts.value.items())
    ]
    return users, max(total.value, len(users))


async def rooms_index(backend: Backend, limit: int) -> list[dict[str, object]]:
    """The rooms with a live member on any instance, most users first (``ws:rooms``, SPEC §15).

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    batch = Batch()
    top = batch.zrevrange(keys.ROOMS, limit)
    await backend.execute(batch)
    return [{"room": room, "users": int(users)} for room, users in top.value]


def _json_object(raw: str | None) -> dict[str, object] | None:
    """A JSON object field as written (``info``), or None when absent or not one."""
    try:
        value = loads(raw) if raw is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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
    its probe did not come back), ``signing_keys_missing`` (``auth.jwks_url``'s key set not
    fetched yet), ``cluster_not_ok`` (a master says the cluster is not ``ok``:
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
    if hub.jwks is not None and not hub.jwks.ready:
        reasons.append("signing_keys_missing")
    if hub.draining:
        reasons.append("draining")
    return reasons, cluster
