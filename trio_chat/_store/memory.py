"""The ``memory://`` backend: Redis's semantics for every :class:`Batch` command, in one process.

It lets ``trio-chat serve`` run with no Redis, and the contract tests hold it to the same replies
as the real thing. Keys expire on :func:`trio.current_time`, so trio's ``MockClock`` drives them.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

import trio

from .._messages import now_ms
from . import keys
from .history import FIELD, StreamId, format_id, parse_id, with_id
from .rooms import is_transition

if TYPE_CHECKING:
    import builtins
    from collections.abc import AsyncIterator, Mapping, Sized

    from .interface import Batch, StreamEntry

# Redis's own wording; the Redis backend raises coredis's WrongTypeError with the same text.
_WRONGTYPE = "Operation against a key holding the wrong kind of value"
# seconds between purges of every expired key, on top of the purge of each key read
_SWEEP_INTERVAL = 1.0


# One class per Redis type, so that a hash and a sorted set (both dicts) never pass for each other.
class _Hash(dict[str, str]):
    pass


class _Set(set[str]):
    pass


class _SortedSet(dict[str, float]):
    """member -> score"""


class _Stream(list[tuple[StreamId, dict[str, str]]]):
    """Entries in id order, and the last id given (kept when its entry is trimmed)."""

    last: StreamId = (0, 0)


_Value = str | _Hash | _Set | _SortedSet | _Stream
_V = TypeVar("_V", str, _Hash, _Set, _SortedSet, _Stream)
_Container = TypeVar("_Container", _Hash, _Set, _SortedSet, _Stream)
_MAX_ID: StreamId = (2**64 - 1, 2**64 - 1)
_T = TypeVar("_T")


def _duration(seconds: float) -> float:
    # the Redis backend sends whole milliseconds, at least one
    return max(seconds, 0.001)


class _Keyspace:
    """The key commands of :class:`Batch`, one method each, named after the command."""

    def __init__(self) -> None:
        self._values: dict[str, _Value] = {}
        self._deadlines: dict[str, float] = {}  # key -> trio time at which it expires
        self._next_sweep = -math.inf

    def sweep(self) -> None:
        """Drop every expired key, at most once per ``_SWEEP_INTERVAL``."""
        now = trio.current_time()
        if now >= self._next_sweep:
            for key in [key for key, deadline in self._deadlines.items() if deadline <= now]:
                self._remove(key)
            self._next_sweep = now + _SWEEP_INTERVAL

    def _live(self, key: str) -> _Value | None:
        deadline = self._deadlines.get(key)
        if deadline is not None and deadline <= trio.current_time():
            self._remove(key)
        return self._values.get(key)

    def _remove(self, key: str) -> None:
        self._values.pop(key, None)
        self._deadlines.pop(key, None)

    def _read(self, key: str, kind: type[_V]) -> _V | None:
        value = self._live(key)
        if value is None:
            return None
        if not isinstance(value, kind):
            raise TypeError(_WRONGTYPE)
        return value

    def _container(self, key: str, kind: type[_Container]) -> _Container:
        container = self._read(key, kind)
        if container is None:
            container = self._values[key] = kind()
        return container

    def _prune(self, key: str, container: Sized) -> None:
        # like Redis, a key whose last member went away is deleted, and its TTL with it
        if not container:
            self._remove(key)

    def _update(self, key: str, container: dict[str, _T], mapping: Mapping[str, _T]) -> int:
        added = len(mapping.keys() - container.keys())
        container.update(mapping)
        self._prune(key, container)
        return added

    def _pop(self, key: str, container: dict[str, _T], names: tuple[str, ...]) -> int:
        removed = sum(container.pop(name, None) is not None for name in set(names))
        self._prune(key, container)
        return removed

    # strings
    def get(self, key: str) -> str | None:
        return self._read(key, str)

    def set(self, key: str, value: str, ex: float | None, nx: bool) -> bool:
        if nx and self._live(key) is not None:
            return False
        self._remove(key)  # SET drops the old value's TTL too
        self._values[key] = value
        if ex is not None:
            self._deadlines[key] = trio.current_time() + _duration(ex)
        return True

    # keys
    def delete(self, *keys: str) -> int:
        deleted = 0
        for key in keys:
            if self._live(key) is not None:
                self._remove(key)
                deleted += 1
        return deleted

    def exists(self, *keys: str) -> int:
        return sum(self._live(key) is not None for key in keys)

    def expire(self, key: str, seconds: float) -> bool:
        if self._live(key) is None:
            return False
        self._deadlines[key] = trio.current_time() + _duration(seconds)
        return True

    def ttl(self, key: str) -> float | None:
        if self._live(key) is None or key not in self._deadlines:
            return None
        return self._deadlines[key] - trio.current_time()

    # hashes
    def hset(self, key: str, mapping: Mapping[str, str]) -> int:
        return self._update(key, self._container(key, _Hash), mapping)

    def hget(self, key: str, field: str) -> str | None:
        return (self._read(key, _Hash) or _Hash()).get(field)

    def hgetall(self, key: str) -> dict[str, str]:
        return dict(self._read(key, _Hash) or {})

    def hdel(self, key: str, *fields: str) -> int:
        return self._pop(key, self._container(key, _Hash), fields)

    def hlen(self, key: str) -> int:
        return len(self._read(key, _Hash) or ())

    def hrandfield(self, key: str, count: int) -> dict[str, str]:
        fields = self._read(key, _Hash) or _Hash()
        return {
            name: fields[name] for name in random.sample(sorted(fields), min(count, len(fields)))
        }

    def hincrby(self, key: str, field: str, delta: int) -> int:
        fields = self._container(key, _Hash)
        try:
            value = int(fields.get(field, "0")) + delta
        except ValueError:
            raise TypeError("ERR hash value is not an integer") from None
        fields[field] = str(value)
        return value

    # sets
    def sadd(self, key: str, *members: str) -> int:
        container = self._container(key, _Set)
        size = len(container)
        container.update(members)
        self._prune(key, container)
        return len(container) - size

    def srem(self, key: str, *members: str) -> int:
        container = self._container(key, _Set)
        size = len(container)
        container.difference_update(members)
        self._prune(key, container)
        return size - len(container)

    def smembers(self, key: str) -> builtins.set[str]:  # `set` is the SET command here
        return set(self._read(key, _Set) or ())

    def scard(self, key: str) -> int:
        return len(self._read(key, _Set) or ())

    # sorted sets
    def zadd(self, key: str, mapping: Mapping[str, float]) -> int:
        return self._update(key, self._container(key, _SortedSet), mapping)

    def zrem(self, key: str, *members: str) -> int:
        return self._pop(key, self._container(key, _SortedSet), members)

    def zrangebyscore(self, key: str, low: float, high: float) -> list[str]:
        scores = self._read(key, _SortedSet) or _SortedSet()
        # Redis orders equal scores by member
        ordered = sorted(scores.items(), key=lambda item: (item[1], item[0]))
        return [member for member, score in ordered if low <= score <= high]

    def zincrby(self, key: str, member: str, amount: float) -> float:
        container = self._container(key, _SortedSet)
        container[member] = score = container.get(member, 0.0) + amount
        return score

    def zremrangebyscore(self, key: str, low: float, high: float) -> int:
        container = self._container(key, _SortedSet)
        doomed = [member for member, score in container.items() if low <= score <= high]
        for member in doomed:
            del container[member]
        self._prune(key, container)
        return len(doomed)

    def zcard(self, key: str) -> int:
        return len(self._read(key, _SortedSet) or ())

    def zrevrange(self, key: str, count: int) -> list[tuple[str, float]]:
        scores = self._read(key, _SortedSet) or _SortedSet()
        ordered = sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)
        return ordered[:count]

    # streams
    def xadd(self, key: str, fields: dict[str, str], maxlen: int) -> str:
        """XADD key MAXLEN maxlen * ...; trims exactly (Redis's ``~`` may keep more)."""
        stream = self._container(key, _Stream)
        ms = time.time_ns() // 1_000_000
        stream.last = (ms, 0) if ms > stream.last[0] else (stream.last[0], stream.last[1] + 1)
        stream.append((stream.last, fields))
        del stream[: max(0, len(stream) - maxlen)]
        return format_id(stream.last)

    def xrange(self, key: str, start: str, end: str, count: int) -> list[StreamEntry]:
        low, high = _bound(start, low=True), _bound(end, low=False)
        entries = self._read(key, _Stream) or _Stream()
        return [(format_id(i), dict(f)) for i, f in entries if low <= i <= high][:count]

    def xrevrange(self, key: str, end: str, start: str, count: int) -> list[StreamEntry]:
        low, high = _bound(start, low=True), _bound(end, low=False)
        entries = self._read(key, _Stream) or _Stream()
        return [(format_id(i), dict(f)) for i, f in reversed(entries) if low <= i <= high][:count]

    def count_after(self, key: str, after: str, limit: int) -> int:
        return len(self.xrange(key, f"({after}", "+", limit))


def _bound(text: str, *, low: bool) -> StreamId:
    """An XRANGE bound: ``-``, ``+``, ``<ms>-<seq>``, or ``(<ms>-<seq>`` (exclusive)."""
    if text in ("-", "+"):
        return (0, 0) if text == "-" else _MAX_ID
    exclusive = text.startswith("(")
    stream_id = parse_id(text.removeprefix("("))
    if stream_id is None:
        raise ValueError(f"Invalid stream ID specified as stream command argument: {text}")
    if not exclusive:
        return stream_id
    ms, seq = stream_id
    if low:
        return (ms, seq + 1) if seq < _MAX_ID[1] else (ms + 1, 0)
    return (ms, seq - 1) if seq > 0 else (ms - 1, _MAX_ID[1])


class _MemorySubscription:
    """A subscriber's channels and the messages published to them since it subscribed.

    The buffer is unbounded so that a publisher never blocks (nor waits for a slow reader), like
    the buffer behind a Redis subscription: the reader, one per instance, must keep up.
    """

    def __init__(self) -> None:
        self.channels: set[str] = set()
        self._send, self._receive = trio.open_memory_channel[tuple[str, str]](math.inf)

    def deliver(self, channel: str, message: str) -> None:
        self._send.send_nowait((channel, message))

    def close(self) -> None:
        self._send.close()

    async def subscribe(self, *channels: str) -> None:
        """Subscribe; messages published from now on are delivered."""
        await trio.lowlevel.checkpoint()
        self.channels.update(channels)

    async def unsubscribe(self, *channels: str) -> None:
        """Unsubscribe; messages already delivered for these channels are still read."""
        await trio.lowlevel.checkpoint()
        self.channels.difference_update(channels)

    def messages(self) -> AsyncIterator[tuple[str, str]]:
        """``(channel, message)`` in publishing order; ends when the subscription is closed."""
        return self._receive

    def backlog(self) -> bool:
        return self._receive.statistics().current_buffer_used > 0


class MemoryBackend:
    """An in-process store and Pub/Sub with Redis's semantics; see :mod:`.interface`.

    Differences from Redis: a command on a key of the wrong type raises :class:`TypeError` (Redis:
    coredis's ``WrongTypeError``) and stops the batch there; a batch runs atomically.
    """

    url = "memory://"

    def __init__(self) -> None:
        self._keyspace = _Keyspace()
        self._subscriptions: set[_MemorySubscription] = set()

    async def execute(self, batch: Batch) -> None:
        """Run every command of ``batch`` and fill in its reply; never unavailable."""
        await trio.lowlevel.checkpoint()  # a real round trip is one too
        self._keyspace.sweep()
        for command in batch.commands:
            match command.name:
                case "publish":
                    command.reply.set(self._publish(*command.args))
                case "append":
                    command.reply.set(self._append(*command.args))
                case "occupy":
                    command.reply.set(self._occupy(*command.args))
                case "renew_room":
                    command.reply.set(self._renew_room(*command.args))
                case "mark_read":
                    command.reply.set(self._mark_read(*command.args))
                case _:
                    command.reply.set(getattr(self._keyspace, command.name)(*command.args))

    def _append(self, key: str, message: str, maxlen: int, ttl: float) -> str:
        """The history script of the Redis backend (:data:`.history.APPEND_SCRIPT`)."""
        entry_id = self._keyspace.xadd(key, {FIELD: message}, maxlen)
        self._keyspace.expire(key, ttl)
        self._publish(key, with_id(message, entry_id))
        return entry_id

    def _occupy(
        self, room: str, session: str, user: str, delta: int, ttl: float, event: str | None
    ) -> tuple[bool, int, int]:
        """The presence script of the Redis backend (:data:`.rooms.OCCUPY_SCRIPT`)."""
        space, members, counts = self._keyspace, keys.room_presence(room), keys.room_users(room)
        if delta > 0:
            changed = bool(space.zadd(members, {session: now_ms()}))
        else:
            changed = bool(space.zrem(members, session))
        space.expire(members, ttl)  # with the counts: neither outlives the other
        sessions = int(space.hget(counts, user) or 0)
        if changed:
            if (sessions := space.hincrby(counts, user, delta)) <= 0:
                space.hdel(counts, user)
        users = self._index(room, ttl)
        if changed and event is not None and is_transition(delta, sessions):
            self._publish(keys.room_channel(room), event)
        return changed, sessions, users

    def _renew_room(self, room: str, members: Mapping[str, str], ttl: float) -> int:
        """The heartbeat script of the Redis backend (:data:`.rooms.RENEW_SCRIPT`)."""
        space, presence, counts = self._keyspace, keys.room_presence(room), keys.room_users(room)
        now = now_ms()
        for session, user in members.items():
            if space.zadd(presence, {session: now}):
                space.hincrby(counts, user, 1)
        space.expire(presence, ttl)
        return self._index(room, ttl)

    def _index(self, room: str, ttl: float) -> int:
        """Renew the room's users hash and set its entry of ``ws:rooms``; its users."""
        space, counts = self._keyspace, keys.room_users(room)
        users = space.hlen(counts)
        if users:
            space.expire(counts, ttl)
            space.zadd(keys.ROOMS, {room: users})
        else:
            space.zrem(keys.ROOMS, room)
        return users

    def _mark_read(
        self, room: str, user: str, message_id: str, ttl: float, ordered: bool, event: str | None
    ) -> bool:
        """The read-marker script of the Redis backend (:data:`.rooms.MARK_READ_SCRIPT`)."""
        space, key = self._keyspace, keys.read_markers(room)
        current = space.hget(key, user)
        if current == message_id:
            return False
        if current is not None and ordered:
            old, new = parse_id(current), parse_id(message_id)
            if old is not None and new is not None and new <= old:
                return False
        space.hset(key, {user: message_id})
        space.expire(key, ttl)
        if event is not None:
            self._publish(keys.room_channel(room), event)
        return True

    def _publish(self, channel: str, message: str) -> int:
        receivers = [sub for sub in self._subscriptions if channel in sub.channels]
        for subscription in receivers:
            subscription.deliver(channel, message)
        return len(receivers)

    @asynccontextmanager
    async def subscription(self) -> AsyncIterator[_MemorySubscription]:
        """A subscriber that receives until the context exits; then ``messages()`` ends."""
        subscription = _MemorySubscription()
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            subscription.close()
