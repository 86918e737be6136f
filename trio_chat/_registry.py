"""What an instance writes about itself and its sessions (SPEC §3, §8), as batch builders,
and the heartbeat that keeps those records alive.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections import defaultdict
from typing import TYPE_CHECKING

import trio

from ._errors import BackendUnavailable
from ._messages import dumps, now_ms
from ._rooms import presence_join, presence_leave
from ._store import keys
from ._store.interface import Backend, Batch

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from ._auth import Identity
    from ._config import Config
    from ._hub import Hub
    from ._messages import JSONValue
    from ._rooms import RoomPolicy, RoomRules
    from ._store.interface import Reply

logger = logging.getLogger(__name__)


def write_session(
    batch: Batch,
    config: Config,
    session_id: str,
    identity: Identity,
    *,
    remote: str,
    connected_at: int,
    rooms: Iterable[str],
    info: Mapping[str, JSONValue] | None = None,
) -> None:
    """Queue the full records of one session: its hash, its user's set, its instance's maps.
    ``info`` is what the connect hook said of it (SPEC §14), kept for presence. (Not its
    presence in ``rooms``: :func:`enter` and the heartbeat write that, and count its user.)"""
    ttl = config.session.ttl
    instance_id = config.server.instance_id
    now = now_ms()
    rooms = sorted(rooms)
    fields = {
        "user_id": identity.user_id,
        "instance": instance_id,
        "connected_at": str(connected_at),
        "last_seen": str(now),
        "rooms": dumps(rooms),
        "token_exp": str(identity.expires_at or 0),  # 0: an opaque session without TTL
        "remote": remote,
    }
    if info is not None:
        fields["info"] = dumps(info)
    batch.hset(keys.session(session_id), fields)
    batch.expire(keys.session(session_id), ttl)
    batch.sadd(keys.user_sessions(identity.user_id), session_id)
    batch.expire(keys.user_sessions(identity.user_id), ttl)
    batch.hset(keys.instance_sessions(instance_id), {session_id: identity.user_id})
    if rooms:
        batch.hset(keys.instance_rooms(instance_id), {session_id: fields["rooms"]})


def remove_session(batch: Batch, instance_id: str, session_id: str, user_id: str) -> None:
    """Queue the removal of every record of one session (its owner's, or a reaper's), but its
    presence in its rooms (:func:`depart`). Doing it twice does no harm."""
    batch.delete(keys.session(session_id))
    batch.srem(keys.user_sessions(user_id), session_id)
    batch.hdel(keys.instance_sessions(instance_id), session_id)
    batch.hdel(keys.instance_rooms(instance_id), session_id)


def write_rooms(batch: Batch, instance_id: str, session_id: str, rooms: Iterable[str]) -> None:
    """Queue the session's room list, where a reaper finds it (SPEC §3), after a join or a
    leave."""
    rooms = dumps(sorted(rooms))
    batch.hset(keys.session(session_id), {"rooms": rooms})
    if rooms != "[]":
        batch.hset(keys.instance_rooms(instance_id), {session_id: rooms})
    else:
        batch.hdel(keys.instance_rooms(instance_id), session_id)


def enter(
    batch: Batch,
    config: Config,
    policy: RoomPolicy,
    room: str,
    session_id: str,
    user_id: str,
    info: Mapping[str, JSONValue] | None,
) -> Reply[tuple[bool, int, int]]:
    """Queue a session's arrival in ``room``: its presence, and its user's count there, which
    announces ``presence_join`` when it is the user's first session there (and the room wants
    it). The reply: see :meth:`Batch.occupy`."""
    event = presence_join(room, user_id, session_id, info) if policy.presence_events else None
    return batch.occupy(room, session_id, user_id, 1, ttl=config.session.ttl, event=event)


def depart(
    batch: Batch,
    config: Config,
    rules: RoomRules,
    session_id: str,
    user_id: str,
    rooms: Iterable[str],
) -> None:
    """Queue a session's departure from ``rooms``: its presence, and its user's counts, each
    announcing ``presence_leave`` when it was the user's last session there (and the room
    wants it). Doing it twice does no harm: the second finds the session gone."""
    for room in rooms:
        event = presence_leave(room, user_id, session_id) if rules(room).presence_events else None
        batch.occupy(room, session_id, user_id, -1, ttl=config.session.ttl, event=event)


def session_rooms(raw: str | None) -> list[str]:
    """The ``rooms`` field of a ``ws:session`` hash, read back; garbage reads as no room."""
    try:
        rooms = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [r for r in rooms if isinstance(r, str)] if isinstance(rooms, list) else []


def write_instance(batch: Batch, config: Config, port: int) -> None:
    instance_id = config.server.instance_id
    batch.hset(
        keys.instance(instance_id),
        {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "port": str(port),
            "started_at": str(now_ms()),
        },
    )
    batch.expire(keys.instance(instance_id), config.session.instance_ttl)
    batch.sadd(keys.INSTANCES, instance_id)


def remove_instance(batch: Batch, instance_id: str, *, leave_to_reaper: bool = False) -> None:
    """Queue the removal of an instance's records. ``leave_to_reaper``: only its liveness key,
    so that a peer reaps the sessions it could not remove itself."""
    if leave_to_reaper:
        batch.delete(keys.instance(instance_id))
        return
    batch.delete(
        keys.instance(instance_id),
        keys.instance_sessions(instance_id),
        keys.instance_rooms(instance_id),
    )
    batch.srem(keys.INSTANCES, instance_id)


async def heartbeat(hub: Hub, port: int) -> None:
    """Renew this instance's and every local session's TTLs every ``session.ttl / 3``.

    One round trip renews a batch of sessions; a session whose record has vanished (Redis
    restarted empty, or evicted) is written again in full in the next round trip. Cleanups
    that failed earlier are retried first. Stops when the drain begins (the connections
    remove their own records then). A failed round is logged and retried at the next tick.
    """
    config = hub.config
    interval = min(config.session.ttl, config.session.instance_ttl) / 3
    while not hub.draining:
        try:
            await hub.flush_cleanups()
            await renew(hub, hub.backend, port, spread=interval / 2)
        except BackendUnavailable as exc:
            logger.warning("heartbeat: redis unreachable: %s", exc)
            hub.redis_up = False
        else:
            hub.redis_up = True
        await trio.sleep(interval)


async def renew(
    hub: Hub, backend: Backend, port: int, *, batch_size: int = 100, spread: float = 0.0
) -> None:
    """One heartbeat round: the instance's records, then every local session's, ``batch_size``
    sessions per round trip, the round trips spaced over ``spread`` seconds. Small batches,
    spread out, keep each pipeline's CPU (packing and reading a few µs per command) from
    stalling every socket of the instance at once, every round."""
    config = hub.config
    ttl = config.session.ttl
    instance = Batch()
    alive = instance.expire(keys.instance(config.server.instance_id), config.session.instance_ttl)
    known = instance.sadd(keys.INSTANCES, config.server.instance_id)
    await backend.execute(instance)
    if not alive.value or known.value:
        # Redis lost our records (restart, eviction) or a peer reaped us: write them again.
        batch = Batch()
        write_instance(batch, config, port)
        await backend.execute(batch)

    sessions = list(hub.sessions.values())
    starts = range(0, len(sessions), batch_size)
    for start in starts:
        if start:
            await trio.sleep(spread / len(starts))
        # Only sessions still here: one that ended while an earlier batch ran is gone.
        chunk = [s for s in sessions[start : start + batch_size] if hub.sessions.get(s.id) is s]
        now = now_ms()
        batch = Batch()
        checks = []
        users: set[str] = set()
        rooms: dict[str, dict[str, str]] = defaultdict(dict)
        renewed_rooms = [frozenset(session.rooms) for session in chunk]
        for session in chunk:
            key = keys.session(session.id)
            checks.append((batch.expire(key, ttl), batch.hget(key, "user_id")))
            batch.hset(key, {"last_seen": str(now)})
            users.add(session.user_id)
            for room in session.rooms:
                rooms[room][session.id] = session.user_id
        for user in users:  # one renewal per key, however many of its sessions are here
            batch.expire(keys.user_sessions(user), ttl)
        for room, members in rooms.items():
            # their presence, and their users counted again where Redis lost them
            batch.renew_room(room, members, ttl=ttl)
        await backend.execute(batch)
        repair = Batch()
        for session, (renewed, user_id), renewed_in in zip(
            chunk, checks, renewed_rooms, strict=True
        ):
            if hub.sessions.get(session.id) is not session:
                # It ended while this batch was in flight, and the batch may have written
                # some of its keys again after its own cleanup: remove them once more.
                remove_session(repair, config.server.instance_id, session.id, session.user_id)
                depart(repair, config, hub.rooms, session.id, session.user_id, renewed_in)
                continue
            if left := renewed_in - session.rooms:
                # left while this batch was in flight, which may have put it back: again
                depart(repair, config, hub.rooms, session.id, session.user_id, left)
            if not renewed.value or user_id.value is None:
                # Vanished, or only a field written since then (a join's HSET): write it all.
                write_session(
                    repair,
                    config,
                    session.id,
                    session.identity,
                    remote=session.remote,
                    connected_at=session.connected_at_ms,
                    rooms=session.rooms,
                    info=session.info,
                )
        if repair:
            logger.info("heartbeat: repairing session records (%d commands)", len(repair))
            await backend.execute(repair)
    await settle(hub, backend)


async def settle(hub: Hub, backend: Backend) -> None:
    """Make Redis agree with the sessions whose join or leave failed half way
    (:attr:`Hub.unsettled`): a session that is not in the room now (or is gone) departs from
    it, which does nothing where it was not counted, and a live one's room list is written
    again. One that has joined the room again meanwhile stays: its join counted it.

    Raises:
        BackendUnavailable: the store could not be reached; they are kept for the next round.
    """
    if not hub.unsettled:
        return
    pending, hub.unsettled = hub.unsettled, set()
    config, batch = hub.config, Batch()
    for session, room in pending:
        live = hub.sessions.get(session.id) is session
        if not (live and room in session.rooms):
            depart(batch, config, hub.rooms, session.id, session.user_id, [room])
        if live:
            write_rooms(batch, config.server.instance_id, session.id, session.rooms)
    try:
        await backend.execute(batch)
    except BackendUnavailable:
        hub.unsettled |= pending
        raise
