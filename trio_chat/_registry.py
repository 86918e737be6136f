"""What an instance writes about itself and its sessions (SPEC §3, §8), as batch builders,
and the heartbeat that keeps those records alive.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

import trio

from . import _keys as keys
from ._errors import BackendUnavailable
from ._messages import dumps, now_ms
from ._store import Backend, Batch

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._auth import Identity
    from ._config import Config
    from ._hub import Hub

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
) -> None:
    """Queue the full records of one session: its hash, its user's set, its instance's map."""
    ttl = config.session.ttl
    instance_id = config.server.instance_id
    now = now_ms()
    batch.hset(
        keys.session(session_id),
        {
            "user_id": identity.user_id,
            "instance": instance_id,
            "connected_at": str(connected_at),
            "last_seen": str(now),
            "rooms": dumps(sorted(rooms)),
            "token_exp": str(identity.expires_at or 0),  # 0: an opaque session without TTL
            "remote": remote,
        },
    )
    batch.expire(keys.session(session_id), ttl)
    batch.sadd(keys.user_sessions(identity.user_id), session_id)
    batch.expire(keys.user_sessions(identity.user_id), ttl)
    batch.hset(keys.instance_sessions(instance_id), {session_id: identity.user_id})
    for room in rooms:
        batch.zadd(keys.room_presence(room), {session_id: now})
        batch.expire(keys.room_presence(room), ttl)


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


def remove_instance(batch: Batch, instance_id: str) -> None:
    batch.delete(keys.instance(instance_id), keys.instance_sessions(instance_id))
    batch.srem(keys.INSTANCES, instance_id)


async def heartbeat(hub: Hub, port: int) -> None:
    """Renew this instance's and every local session's TTLs every ``session.ttl / 3``.

    One round trip renews a batch of sessions; a session whose hash has vanished (Redis
    restarted empty, or evicted) is written again in full in the next round trip. Runs until
    cancelled; a failed round is logged and retried at the next tick.
    """
    config = hub.config
    interval = min(config.session.ttl, config.session.instance_ttl) / 3
    while True:
        try:
            await renew(hub, hub.backend, port)
        except BackendUnavailable as exc:
            logger.warning("heartbeat: redis unreachable: %s", exc)
        await trio.sleep(interval)


async def renew(hub: Hub, backend: Backend, port: int, *, batch_size: int = 500) -> None:
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
    for start in range(0, len(sessions), batch_size):
        chunk = sessions[start : start + batch_size]
        now = now_ms()
        batch = Batch()
        renewed = []
        for session in chunk:
            renewed.append(batch.expire(keys.session(session.id), ttl))
            batch.hset(keys.session(session.id), {"last_seen": str(now)})
            batch.expire(keys.user_sessions(session.user_id), ttl)
            for room in session.rooms:
                batch.zadd(keys.room_presence(room), {session.id: now})
                batch.expire(keys.room_presence(room), ttl)
        await backend.execute(batch)
        lost = [s for s, reply in zip(chunk, renewed, strict=True) if not reply.value]
        if lost:
            logger.warning("heartbeat: %d session records had vanished; rewriting", len(lost))
            rewrite = Batch()
            for session in lost:
                write_session(
                    rewrite,
                    config,
                    session.id,
                    session.identity,
                    remote=session.remote,
                    connected_at=session.connected_at_ms,
                    rooms=session.rooms,
                )
            await backend.execute(rewrite)
