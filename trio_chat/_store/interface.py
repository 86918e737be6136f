"""The small interface both backends implement: batched key commands and Pub/Sub.

Everything trio-chat keeps in Redis goes through a :class:`Batch`: commands queued locally, sent
in one round trip (a non-transactional pipeline, so it also works across Redis Cluster slots),
and answered through typed :class:`Reply` handles. The in-memory backend implements the same
commands with the same semantics, and one contract test suite runs against both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import attrs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from contextlib import AbstractAsyncContextManager

T = TypeVar("T")
#: one stream entry: its id and its fields
StreamEntry = tuple[str, dict[str, str]]

_UNSET: Any = object()
# ``Batch.set`` (Redis SET) shadows the builtin inside the class body.
_StrSet = set[str]


class Reply(Generic[T]):
    """The answer to one queued command, readable once its batch has run."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value: T = _UNSET

    @property
    def value(self) -> T:
        if self._value is _UNSET:
            raise RuntimeError("the batch holding this command has not run yet")
        return self._value

    def set(self, value: T) -> None:
        self._value = value


@attrs.frozen
class Command:
    """One queued command: its name (a Redis command), its arguments and its reply handle."""

    name: str
    args: tuple[Any, ...]
    reply: Reply[Any]


class Batch:
    """Commands to send in one round trip; build one, then ``await backend.execute(batch)``.

    Durations are float seconds (sent as milliseconds); scores are floats; all keys, fields,
    members and values are ``str``.
    """

    def __init__(self) -> None:
        self.commands: list[Command] = []

    def __len__(self) -> int:
        return len(self.commands)

    def _add(self, name: str, *args: Any) -> Reply[Any]:
        reply: Reply[Any] = Reply()
        self.commands.append(Command(name, args, reply))
        return reply

    # strings
    def get(self, key: str) -> Reply[str | None]:
        return self._add("get", key)

    def set(
        self, key: str, value: str, *, ex: float | None = None, nx: bool = False
    ) -> Reply[bool]:
        """SET; the reply is False when ``nx`` was given and the key existed."""
        return self._add("set", key, value, ex, nx)

    # keys
    def delete(self, *keys: str) -> Reply[int]:
        return self._add("delete", *keys)

    def exists(self, *keys: str) -> Reply[int]:
        return self._add("exists", *keys)

    def expire(self, key: str, seconds: float) -> Reply[bool]:
        """PEXPIRE; the reply is False when the key does not exist."""
        return self._add("expire", key, seconds)

    def ttl(self, key: str) -> Reply[float | None]:
        """Seconds left to live; None when the key has no TTL or does not exist."""
        return self._add("ttl", key)

    # hashes
    def hset(self, key: str, mapping: Mapping[str, str]) -> Reply[int]:
        return self._add("hset", key, dict(mapping))

    def hget(self, key: str, field: str) -> Reply[str | None]:
        return self._add("hget", key, field)

    def hgetall(self, key: str) -> Reply[dict[str, str]]:
        return self._add("hgetall", key)

    def hdel(self, key: str, *fields: str) -> Reply[int]:
        return self._add("hdel", key, *fields)

    def hlen(self, key: str) -> Reply[int]:
        return self._add("hlen", key)

    def hrandfield(self, key: str, count: int) -> Reply[dict[str, str]]:
        """HRANDFIELD WITHVALUES: up to ``count`` distinct fields (all when fewer), any ones."""
        return self._add("hrandfield", key, count)

    # sets
    def sadd(self, key: str, *members: str) -> Reply[int]:
        return self._add("sadd", key, *members)

    def srem(self, key: str, *members: str) -> Reply[int]:
        return self._add("srem", key, *members)

    def smembers(self, key: str) -> Reply[_StrSet]:
        return self._add("smembers", key)

    def scard(self, key: str) -> Reply[int]:
        return self._add("scard", key)

    # sorted sets
    def zadd(self, key: str, mapping: Mapping[str, float]) -> Reply[int]:
        return self._add("zadd", key, dict(mapping))

    def zrem(self, key: str, *members: str) -> Reply[int]:
        return self._add("zrem", key, *members)

    def zrangebyscore(self, key: str, min: float, max: float) -> Reply[list[str]]:
        """Members with ``min <= score <= max``, lowest score first."""
        return self._add("zrangebyscore", key, min, max)

    def zincrby(self, key: str, member: str, amount: float) -> Reply[float]:
        return self._add("zincrby", key, member, amount)

    def zremrangebyscore(self, key: str, min: float, max: float) -> Reply[int]:
        return self._add("zremrangebyscore", key, min, max)

    def zcard(self, key: str) -> Reply[int]:
        return self._add("zcard", key)

    def zrevrange(self, key: str, count: int) -> Reply[list[tuple[str, float]]]:
        """The ``count`` members of highest score, with their scores, highest first (equal
        scores: the member greater first)."""
        return self._add("zrevrange", key, count)

    # streams
    def append(self, key: str, message: str, *, maxlen: int, ttl: float) -> Reply[str]:
        """Append a room message to its history and publish it, in one step (SPEC §11).

        The history script: XADD ``message`` (a JSON object without ``id``) as field ``m`` of
        the stream ``key`` (``MAXLEN ~ maxlen``), expire the stream after ``ttl``, and PUBLISH
        the message, with ``"id"`` = the new entry id first, on the channel of the same name.
        The reply is the entry id, ``<ms>-<seq>``.

        Redis runs the script by its SHA. Where Redis has lost it (restarted empty), the
        appends of that round trip are sent again, in order, once it is loaded: after the
        other commands of the round trip, so read a stream in a later batch than its appends.
        """
        return self._add("append", key, message, maxlen, ttl)

    def xrange(self, key: str, start: str, end: str, count: int) -> Reply[list[StreamEntry]]:
        """XRANGE: at most ``count`` entries with ``start <= id <= end``, oldest first;
        ``-``/``+`` are the ends, and ``(<id>`` excludes that id."""
        return self._add("xrange", key, start, end, count)

    def xrevrange(self, key: str, end: str, start: str, count: int) -> Reply[list[StreamEntry]]:
        """XREVRANGE: as :meth:`xrange`, newest first."""
        return self._add("xrevrange", key, end, start, count)

    def count_after(self, key: str, after: str, limit: int) -> Reply[int]:
        """How many entries of the stream ``key`` follow the id ``after``, counting up to
        ``limit`` (a script: the entries are not sent)."""
        return self._add("count_after", key, after, limit)

    # rooms (SPEC §15; see :mod:`.rooms`)
    def occupy(
        self, room: str, session: str, user: str, delta: int, *, ttl: float, event: str | None
    ) -> Reply[tuple[bool, int, int]]:
        """``session`` of ``user`` enters ``room`` (``delta`` 1) or leaves it (-1).

        Its membership in ``ws:room:<room>`` changes (``ZADD`` with the time now, or ``ZREM``),
        and only if it did, the user's count in ``ws:room:<room>:users`` (a count that drops to
        0 is removed); both keys' TTLs are renewed, the room's score in ``ws:rooms`` is its
        number of users (at 0 it is removed), and when the change was the user's arrival (no
        session there before) or departure (none left), ``event`` (when given) is PUBLISHed on
        ``chat:room:<room>``. Done twice, the second does nothing. The reply: whether the
        membership changed, the user's sessions in the room, the room's users.
        """
        return self._add("occupy", room, session, user, delta, ttl, event)

    def renew_room(self, room: str, members: Mapping[str, str], *, ttl: float) -> Reply[int]:
        """The heartbeat of ``room``'s local ``members`` (session id -> user id): each one's
        score in ``ws:room:<room>`` is the time now, and those that were not members (lost by
        Redis) are counted in again without an event; TTLs and ``ws:rooms`` as
        :meth:`occupy`. The reply is the room's users."""
        return self._add("renew_room", room, dict(members), ttl)

    def mark_read(
        self, room: str, user: str, message_id: str, *, ttl: float, ordered: bool, event: str | None
    ) -> Reply[bool]:
        """Set ``user``'s marker in ``ws:read:<room>`` to ``message_id`` unless it is there
        already, or (``ordered``: stream ids) is not older; renew the TTL; and when it moved,
        PUBLISH ``event`` (when given) on ``chat:room:<room>``. The reply: whether it moved."""
        return self._add("mark_read", room, user, message_id, ttl, ordered, event)

    # pub/sub
    def publish(self, channel: str, message: str) -> Reply[int]:
        """PUBLISH; the reply is the number of subscribers that received it."""
        return self._add("publish", channel, message)


class Subscription(Protocol):
    """One Pub/Sub connection.

    ``messages()`` yields ``(channel, payload)`` in the order the server sent them and raises
    :class:`~trio_chat._errors.BackendUnavailable` when the connection is lost; the owner then
    opens a new subscription and subscribes again (the backend does not do it silently).
    """

    async def subscribe(self, *channels: str) -> None:
        """Subscribe and return once the server acknowledged every channel."""

    async def unsubscribe(self, *channels: str) -> None:
        """Unsubscribe; messages already in flight for these channels may still arrive."""

    def messages(self) -> AsyncIterator[tuple[str, str]]: ...

    def backlog(self) -> bool:
        """True when another message can be read at once, without waiting."""
        ...


class Backend(Protocol):
    """A connected store; obtained from :func:`trio_chat._store.backends.open_backend`."""

    #: the URL it was opened with, with any password removed
    url: str

    async def execute(self, batch: Batch) -> None:
        """Run every command of ``batch`` in one round trip and fill in their replies.

        Raises:
            BackendUnavailable: the store could not be reached or timed out.
        """

    def subscription(self) -> AbstractAsyncContextManager[Subscription]:
        """Open a dedicated Pub/Sub connection, closed when the context exits.

        Raises:
            BackendUnavailable: on entry, when the store cannot be reached.
        """
        ...
