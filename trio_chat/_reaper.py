"""Reaping dead instances (SPEC §8).

An instance that died without cleaning up leaves its id in ``ws:instances`` and its sessions
in ``ws:instance:<id>:sessions``; its ``ws:instance:<id>`` key expires after
``session.instance_ttl``. Any live instance (or ``trio-chat clean``) that sees such an id takes
the ``ws:reap:<id>`` lock, so exactly one of them removes the dead sessions from the users'
sets and the rooms' presence, deletes their keys, and finally forgets the instance. The rooms
of a dead session are read from ``ws:instance:<id>:rooms`` (its ``ws:session`` record may have
expired): its user's count in each drops, and where that was the user's last session there,
the room's members get ``presence_leave`` (SPEC §15).
"""

from __future__ import annotations

import logging
import os
import random
import socket
from typing import TYPE_CHECKING

import trio

from ._errors import BackendUnavailable
from ._registry import depart, remove_instance, remove_session, session_rooms
from ._rooms import RoomRules
from ._store import keys
from ._store.backends import open_backend
from ._store.interface import Backend, Batch

if TYPE_CHECKING:
    from ._config import Config

logger = logging.getLogger(__name__)

#: how long a reaper may hold an instance's lock before another may try
REAP_LOCK_SECONDS = 30.0
#: sessions removed per round trip
_CHUNK = 1000


async def sweep(
    backend: Backend,
    reaper_id: str,
    config: Config,
    *,
    suspects: dict[str, float] | None = None,
    grace: float = 0.0,
) -> list[str]:
    """Reap every registered instance whose liveness key has expired.

    Args:
        backend: the store.
        reaper_id: who takes the locks (never reaped by itself).
        config: the deployment's configuration (its rooms' options, its session TTL).
        suspects: a reaper's memory across sweeps: instance id -> when (trio time) its key
            was first seen missing. With it, an instance is reaped only once its key has been
            missing for ``grace`` seconds. After Redis stalled for longer than
            ``session.instance_ttl``, every instance key has expired at once, the live ones'
            too; those are written back within a third of that by their heartbeats.

    Returns:
        The ids of the instances this call reaped (not those another reaper holds).

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    listing = Batch()
    members = listing.smembers(keys.INSTANCES)
    await backend.execute(listing)
    candidates = sorted(members.value - {reaper_id})
    if not candidates:
        return []
    probe = Batch()
    alive = [probe.exists(keys.instance(i)) for i in candidates]
    await backend.execute(probe)
    dead = [i for i, reply in zip(candidates, alive, strict=True) if not reply.value]
    if suspects is not None:
        now = trio.current_time()
        for instance_id in suspects.keys() - set(dead):
            del suspects[instance_id]  # back (or reaped by another)
        dead = [i for i in dead if now - suspects.setdefault(i, now) >= grace]
    if not dead:
        return []
    locking = Batch()
    locks = [locking.set(keys.reap_lock(i), reaper_id, ex=REAP_LOCK_SECONDS, nx=True) for i in dead]
    await backend.execute(locking)
    reaped = []
    for instance_id, lock in zip(dead, locks, strict=True):
        if lock.value:
            count = await reap(backend, instance_id, config)
            logger.warning("reaped dead instance %s (%d sessions)", instance_id, count)
            reaped.append(instance_id)
    return reaped


async def reap(backend: Backend, instance_id: str, config: Config) -> int:
    """Remove every trace of ``instance_id``'s sessions; return how many there were."""
    batch = Batch()
    owned = batch.hgetall(keys.instance_sessions(instance_id))
    listed = batch.hgetall(keys.instance_rooms(instance_id))
    await backend.execute(batch)
    sessions = owned.value
    lookup = Batch()
    recorded = {sid: lookup.hget(keys.session(sid), "rooms") for sid in sessions}
    if recorded:
        await backend.execute(lookup)
    rules = RoomRules(config)
    # In chunks, so that a big instance does not make one pipeline too slow to ever finish.
    items = list(sessions.items())
    for start in range(0, len(items), _CHUNK):
        cleanup = Batch()
        for session_id, user_id in items[start : start + _CHUNK]:
            rooms = set(session_rooms(listed.value.get(session_id)))
            rooms.update(session_rooms(recorded[session_id].value))
            # (both may be done again by the next reaper if this one dies half-way)
            depart(cleanup, config, rules, session_id, user_id, sorted(rooms))
            remove_session(cleanup, instance_id, session_id, user_id)
        await backend.execute(cleanup)
    # Forget the instance last: if this dies half-way, the id is still there to reap again.
    cleanup = Batch()
    remove_instance(cleanup, instance_id)
    await backend.execute(cleanup)
    return len(sessions)


async def cleaner(backend: Backend, config: Config) -> None:
    """Sweep every ``session.instance_ttl`` (with jitter, so peers don't sweep in step); an
    instance is reaped once its key has been missing for ``session.instance_ttl`` (see
    :func:`sweep`), so a Redis stall does not get live peers reaped."""
    suspects: dict[str, float] = {}
    while True:
        await trio.sleep(config.session.instance_ttl * random.uniform(0.5, 1.0))
        try:
            await sweep(
                backend,
                config.server.instance_id,
                config,
                suspects=suspects,
                grace=config.session.instance_ttl,
            )
        except BackendUnavailable as exc:
            logger.warning("cleaner: redis unreachable: %s", exc)


async def clean_once(config: Config) -> list[str]:
    """One sweep as its own short-lived reaper (``trio-chat clean``); returns the reaped ids.

    Raises:
        BackendUnavailable: the store could not be reached.
    """
    reaper_id = f"clean-{socket.gethostname()}-{os.getpid()}"
    async with open_backend(
        config.redis.url, command_timeout=config.redis.command_timeout
    ) as backend:
        return await sweep(backend, reaper_id, config)
