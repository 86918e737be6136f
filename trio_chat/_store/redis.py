"""The Redis backend: our own RESP connections (:mod:`.resp`), with coredis's URL parsing,
parser and error classes.

A batch is one non-transactional pipeline on the backend's connection; a subscription is a
connection of its own. Every round trip is bounded by ``command_timeout``, and every way of not
getting an answer (connection refused or lost, timeout, a paused server) becomes
:class:`~trio_chat._errors.BackendUnavailable`. Nothing retries in the background: the next
call after a failure connects again, so the backend recovers by itself once Redis is back.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import coredis
import trio
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import NoScriptError, ResponseError
from coredis.retry import NoRetryPolicy

from .._errors import BackendUnavailable, ConfigError, first_leaf, single_error
from .._messages import now_ms
from . import keys, resp
from .history import APPEND_SCRIPT, APPEND_SHA
from .keys import hash_slot, is_shard_channel
from .resp import NotConnected
from .rooms import (
    COUNT_AFTER_SHA,
    COUNT_SHA,
    MARK_READ_SHA,
    OCCUPY_SHA,
    RENEW_SHA,
    SCRIPTS,
    occupy_call,
    renew_call,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence

    from .interface import Batch, Command
    from .resp import Arg

# What "Redis did not answer" looks like: coredis's ConnectionError (ours for a connection Redis
# closed or that could not be made, and a server still loading its data), OSError (TimeoutError
# is one), our own trio.fail_after, trio's stream errors, and anyio's, which coredis lets
# through (the cluster's slot map is still read by a coredis client).
_UNAVAILABLE = (
    RedisConnectionError,
    OSError,
    trio.TooSlowError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    trio.BrokenResourceError,  # our own connections' (.resp)
    trio.ClosedResourceError,  # ... and one that was closed meanwhile (lost or given up)
)

logger = logging.getLogger(__name__)


@contextmanager
def unavailable(what: str) -> Iterator[None]:
    """Turn a lost connection or a timeout, bare or grouped by a task group, into ours."""
    try:
        yield
    except* _UNAVAILABLE as group:
        sent = not isinstance(first_leaf(group), NotConnected)
        raise BackendUnavailable(f"{what}: {_describe(group)}", sent=sent) from group


def _describe(error: BaseException) -> str:
    """The first exception of what may be a group of groups, as ``Type: message``."""
    error = first_leaf(error)
    return ": ".join(filter(None, (type(error).__name__, str(error))))


def without_password(url: str) -> str:
    """``url`` for logs and messages: no password, in the authority or as a query argument."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    )
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def make_client(url: str, *, timeout: float, **options: Any) -> coredis.Redis[str]:
    """A coredis client for the server at ``url`` that fails at once (no retry), every round
    trip and connection bounded by ``timeout``; ``options`` go to coredis. It does no I/O."""
    return coredis.Redis.from_url(
        url,
        decode_components=True,  # so that a password may be %-encoded
        decode_responses=True,
        retry_policy=NoRetryPolicy(),  # a failure is reported at once; callers decide
        connect_timeout=timeout,
        stream_timeout=timeout,
        **options,
    )


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _args(command: Command, sharded: bool) -> list[Arg] | None:
    """The Redis command for ``command``; None when it names nothing to act on (its reply is 0).

    Redis refuses e.g. ``SREM key`` with no member as a syntax error; the memory backend just
    answers 0, and so do we, without sending it. On a cluster node (``sharded``), room and
    control channels are shard channels: SPUBLISH, from the history script too (SPEC §12).
    """
    match command.name, command.args:
        case "get", (key,):
            return ["GET", key]
        case "set", (key, value, ex, nx):
            return [
                "SET",
                key,
                value,
                *(() if ex is None else ("PX", _milliseconds(ex))),
                *(("NX",) if nx else ()),
            ]
        case (("delete" | "exists"), ()):
            return None
        case "delete", deleted:
            return ["DEL", *deleted]
        case "exists", probed:
            return ["EXISTS", *probed]
        case "expire", (key, seconds):
            return ["PEXPIRE", key, _milliseconds(seconds)]
        case "ttl", (key,):
            return ["PTTL", key]
        case (("hset" | "zadd"), (_, mapping)) if not mapping:
            return None
        case (("hdel" | "sadd" | "srem" | "zrem"), (_,)):
            return None
        case "hset", (key, mapping):
            return ["HSET", key, *(item for pair in mapping.items() for item in pair)]
        case "hget", (key, field):
            return ["HGET", key, field]
        case "hgetall", (key,):
            return ["HGETALL", key]
        case "hdel", (key, *fields):
            return ["HDEL", key, *fields]
        case "hlen", (key,):
            return ["HLEN", key]
        case "hrandfield", (key, count):
            return ["HRANDFIELD", key, count, "WITHVALUES"]
        case "sadd", (key, *members):
            return ["SADD", key, *members]
        case "srem", (key, *members):
            return ["SREM", key, *members]
        case "smembers", (key,):
            return ["SMEMBERS", key]
        case "scard", (key,):
            return ["SCARD", key]
        case "zadd", (key, mapping):
            return ["ZADD", key, *(item for m, s in mapping.items() for item in (float(s), m))]
        case "zrem", (key, *members):
            return ["ZREM", key, *members]
        case "zrangebyscore", (key, low, high):
            return ["ZRANGEBYSCORE", key, float(low), float(high)]
        case "zremrangebyscore", (key, low, high):
            return ["ZREMRANGEBYSCORE", key, float(low), float(high)]
        case "zcard", (key,):
            return ["ZCARD", key]
        case "zrevrange", (key, count):
            return ["ZREVRANGE", key, 0, count - 1, "WITHSCORES"]
        case "publish", (channel, message) if sharded and is_shard_channel(channel):
            return ["SPUBLISH", channel, message]
        case "publish", (channel, message):
            return ["PUBLISH", channel, message]
        case "append", (key, message, maxlen, ttl):
            publish = "SPUBLISH" if sharded else "PUBLISH"
            return _evalsha(APPEND_SHA, [key], [message, maxlen, _milliseconds(ttl), publish])
        case "occupy", (room, session, user, delta, ttl, event):
            # (a cluster takes this in steps: see .cluster.ClusterBackend)
            names, argv = occupy_call(
                room, session, user, delta, now_ms(), _milliseconds(ttl), event
            )
            return _evalsha(OCCUPY_SHA, names, argv)
        case "renew_room", (room, members, ttl):
            names, argv = renew_call(room, members, now_ms(), _milliseconds(ttl))
            return _evalsha(RENEW_SHA, names, argv)
        case "count", (key, ttl, changes):  # a cluster's step: see .rooms.COUNT_SCRIPT
            counted: list[Arg] = [_milliseconds(ttl)]
            for user, delta in changes:
                counted += [user, delta]
            return _evalsha(COUNT_SHA, [key], counted)
        case "zincrby", (key, member, amount):
            return ["ZINCRBY", key, float(amount), member]
        case "mark_read", (room, user, message_id, ttl, ordered, event):
            channel = "" if sharded else keys.room_channel(room)  # a cluster publishes after
            published = "" if sharded or event is None else event
            order = "1" if ordered else "0"
            marked = [user, message_id, _milliseconds(ttl), channel, published, "PUBLISH", order]
            return _evalsha(MARK_READ_SHA, [keys.read_markers(room)], marked)
        case "count_after", (key, after, limit):
            return _evalsha(COUNT_AFTER_SHA, [key], [after, limit])
        case "asking", ():  # the next command is for a slot this node is importing
            return ["ASKING"]
        case "xrange", (key, start, end, count):
            return ["XRANGE", key, start, end, "COUNT", count]
        case "xrevrange", (key, end, start, count):
            return ["XREVRANGE", key, end, start, "COUNT", count]
    raise ValueError(f"unsupported command {command.name}{command.args!r}")


def _evalsha(sha: str, names: Sequence[str], argv: Sequence[Arg]) -> list[Arg]:
    return ["EVALSHA", sha, len(names), *names, *argv]


#: every script, by its SHA
_SCRIPTS = {APPEND_SHA: APPEND_SCRIPT, **SCRIPTS}
#: the SHA of the script each scripted command runs
_SCRIPTED = {
    "append": APPEND_SHA,
    "occupy": OCCUPY_SHA,
    "renew_room": RENEW_SHA,
    "count": COUNT_SHA,
    "mark_read": MARK_READ_SHA,
    "count_after": COUNT_AFTER_SHA,
}


def _script_of(command: Command) -> str:
    return _SCRIPTED[command.name]


def _pairs(flat: list[Any]) -> Iterator[tuple[Any, Any]]:
    """``[k1, v1, k2, v2...]`` (how RESP2 answers a map) as pairs."""
    items = iter(flat)
    return zip(items, items, strict=True)


def _reply(name: str, value: Any) -> Any:
    """What :class:`~.interface.Batch` promises for ``name``, from Redis's RESP2 reply."""
    match name:
        case "set":
            return value is not None  # OK; nil: NX and the key existed
        case "expire" | "mark_read":
            return bool(value)
        case "ttl":  # PTTL: -2 no such key, -1 no TTL
            return None if value < 0 else value / 1000
        case "hgetall" | "hrandfield":
            return dict(_pairs(value or []))
        case "smembers":
            return set(value)
        case "zrevrange":
            return [(member, float(score)) for member, score in _pairs(value)]
        case "zincrby":
            return float(value)
        case "occupy":
            return bool(value[0]), int(value[1]), int(value[2])
        case "count":
            return [int(n) for n in value]
        case "xrange" | "xrevrange":
            return [(entry_id, dict(_pairs(fields))) for entry_id, fields in value]
    return value


class _Queued:
    """A batch waiting for the next pipeline, and what became of it."""

    __slots__ = ("abandoned", "batch", "done", "each", "error", "taken")

    def __init__(self, batch: Batch, each: bool) -> None:
        self.batch = batch
        self.each = each  # error replies go to their commands' replies, not raised
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.taken = False  # in a pipeline now: it may have run, whatever happens next
        self.abandoned = False  # its caller gave up before it was taken: never send it


class RedisBackend:
    """A :class:`~.interface.Backend` on Redis; open it with :func:`open_redis_backend`.

    Batches are pipelined together: :meth:`execute` queues its batch, and one task sends
    everything queued as one pipeline while the previous pipeline is out, then the next. Under
    load, the handshakes, sends and cleanups of many connections share a round trip. Alone, a
    batch is sent at once.

    That task owns the one connection pipelines go over (:mod:`.resp`: written and read by the
    task itself, not by coredis, whose per-pipeline path cost more CPU than everything else a
    send does in Redis's client). A round trip is bounded by ``command_timeout`` and shielded
    from its callers' cancellation; one that failed (Redis restarted, paused, slow) leaves its
    connection closed, and the next one connects again.
    """

    def __init__(
        self,
        url: str,
        nursery: trio.Nursery,
        *,
        command_timeout: float,
        ping_interval: float,
        sharded: bool = False,
    ) -> None:
        #: the URL without its password
        self.url = without_password(url)
        self._nursery = nursery  # holds the sender task
        self._timeout = command_timeout
        self._ping_interval = ping_interval
        self._sharded = sharded  # a node of a cluster: shard channels are SPUBLISHed
        try:
            # coredis reads the URL (no I/O): where to connect and how to log in
            self._server = resp.target(make_client(url, timeout=command_timeout))
        except ValueError as exc:  # e.g. a port or db that is not a number
            raise ConfigError(f"redis.url: {exc}") from exc
        self._connection: resp.Connection | None = None
        self._closed = False
        self._queued: deque[_Queued] = deque()
        self._wake = trio.Event()  # set when a batch is queued
        self._sending = False  # the sender task runs; execute() fails at once without it

    async def _open(self) -> None:
        await self._round_trip([["PING"]])
        await self._nursery.start(self._send_queued)

    async def _round_trip(self, commands: list[list[resp.Arg]]) -> list[Any]:
        """Send ``commands`` as one pipeline on our connection, opened first if there is none;
        shielded and bounded (see the class docs).

        Raises:
            BackendUnavailable: Redis could not be reached or did not answer in time.
        """
        deadline = trio.current_time() + self._timeout
        try:
            with unavailable(f"Redis at {self.url}"):
                if self._closed:
                    raise NotConnected("the backend is closed")
                if self._connection is not None and self._connection.closed():
                    self._drop()
                if self._connection is None:
                    # apart from the round trip: a handshake unanswered means nothing was sent
                    with trio.move_on_at(deadline, shield=True):
                        self._connection = await resp.connect(self._server)
                    if self._connection is None:
                        raise NotConnected(f"no answer to the handshake in {self._timeout}s")
                with trio.fail_at(deadline, shield=True):
                    return await self._connection.round_trip(commands)
        except BaseException:
            self._drop()  # in an unknown state: never used again
            raise

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _close(self) -> None:
        """Close the connection (a round trip on it ends at once) and open no other."""
        self._closed = True
        self._drop()

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        """Run ``commands`` as one pipeline: each one's reply, or the error Redis answered it
        with.

        Scripts (history, presence, read markers) are sent by their SHA only; where Redis does
        not have one (it restarted empty, or SCRIPT FLUSH), it is loaded and those commands,
        which did not run, are sent again in their order.
        """
        requests = [_args(command, self._sharded) for command in commands]
        sent = [request for request in requests if request is not None]
        answers = iter(await self._round_trip(sent) if sent else ())
        replies = [0 if request is None else next(answers) for request in requests]
        if missing := [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]:
            scripts = sorted({_SCRIPTS[_script_of(commands[n])] for n in missing})
            loading: list[list[resp.Arg]] = [["SCRIPT", "LOAD", script] for script in scripts]
            retried = [request for n in missing if (request := requests[n]) is not None]
            again = await self._round_trip(loading + retried)
            for reply in again[: len(scripts)]:
                if isinstance(reply, ResponseError):
                    raise reply
            for n, reply in zip(missing, again[len(scripts) :], strict=True):
                replies[n] = reply
        return replies

    async def execute(self, batch: Batch, *, each: bool = False) -> None:
        """Send ``batch`` in the next pipeline and fill in its replies.

        It waits at most ``command_timeout`` to be sent; once sent, it runs to its end, or to
        its own ``command_timeout``, even when the caller is cancelled meanwhile (see the
        class docstring). So BackendUnavailable means either "never sent" or "Redis did not
        answer", never "ran, but we stopped waiting". A command on a key of the wrong type
        raises coredis's ``WrongTypeError``, after the whole pipeline ran; with ``each``, a
        command Redis answered with an error gets that error as its reply instead (the cluster
        backend reads its redirections so).

        Raises:
            BackendUnavailable: Redis could not be reached or did not answer in time.
        """
        if not batch.commands:
            return
        if not self._sending:
            raise BackendUnavailable(f"Redis at {self.url}: the backend is closed", sent=False)
        queued = _Queued(batch, each)
        self._queued.append(queued)
        self._wake.set()
        # (one scope, shielded and bounded: this runs for every batch)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + self._timeout):
            await queued.done.wait()
        if not queued.done.is_set():
            if not queued.taken:
                queued.abandoned = True
                raise BackendUnavailable(
                    f"Redis at {self.url}: not sent within {self._timeout}s (busy)",
                    sent=False,
                )
            with trio.CancelScope(shield=True):
                await queued.done.wait()  # bounded: the pipeline has its own timeout
        if queued.error is not None:
            raise queued.error

    #: commands per pipeline, beyond which queued batches wait for the next one
    PIPELINE_COMMANDS = 1000

    async def _send_queued(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send what :meth:`execute` queued, one pipeline at a time, for as long as we live."""
        self._sending = True
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._queued:
                    taken: list[_Queued] = []
                    size = 0
                    while self._queued and size < self.PIPELINE_COMMANDS:
                        queued = self._queued.popleft()
                        if not queued.abandoned:
                            queued.taken = True
                            taken.append(queued)
                            size += len(queued.batch.commands)
                    await self._send(taken)
        finally:  # the backend is closing: nothing will send what is still queued
            self._sending = False
            while self._queued:
                queued = self._queued.popleft()
                queued.error = BackendUnavailable(
                    f"Redis at {self.url}: the backend is closed", sent=False
                )
                queued.done.set()

    async def _send(self, taken: list[_Queued]) -> None:
        commands = [command for queued in taken for command in queued.batch.commands]
        try:
            replies = await self._pipeline(commands)
        except BackendUnavailable as exc:
            for queued in taken:
                queued.error = BackendUnavailable(str(exc), sent=exc.sent)
                queued.error.__cause__ = exc.__cause__
        except Exception as exc:  # a bug of ours or coredis's: these batches fail with it
            logger.exception("Redis pipeline failed")
            for queued in taken:
                queued.error = exc
        else:
            position = 0
            for queued in taken:
                mine = replies[position : position + len(queued.batch.commands)]
                position += len(mine)
                try:
                    errors = [reply for reply in mine if isinstance(reply, ResponseError)]
                    if errors and not queued.each:
                        queued.error = errors[0]
                        continue
                    for command, reply in zip(queued.batch.commands, mine, strict=True):
                        failed = isinstance(reply, ResponseError)
                        command.reply.set(reply if failed else _reply(command.name, reply))
                except Exception as exc:  # a reply we cannot read: this batch's failure only
                    logger.exception("Redis reply not understood")
                    queued.error = BackendUnavailable(f"Redis reply not understood: {exc!r}")
        finally:
            for queued in taken:
                queued.done.set()

    @asynccontextmanager
    async def subscription(self) -> AsyncIterator[RedisSubscription]:
        """Open a Pub/Sub connection of its own, read by a task of this context; see Backend.

        Raises:
            BackendUnavailable: on entry, when Redis cannot be reached within the timeout.
        """
        async with open_subscription(
            lambda node: self._server,
            lambda channel: self.url,
            self.url,
            command_timeout=self._timeout,
            ping_interval=self._ping_interval,
        ) as subscription:
            yield subscription


@asynccontextmanager
async def open_subscription(
    connect: Callable[[str], resp.Target],
    route: Callable[[str], str],
    first: str,
    *,
    command_timeout: float,
    ping_interval: float,
    sharded: bool = False,
) -> AsyncIterator[RedisSubscription]:
    """A :class:`RedisSubscription` whose connection to node ``first`` is open; it is closed,
    with every connection it opened, when the context exits.

    Args:
        connect: where a node is and how to log in there.
        route: the node whose connection subscribes a channel.
        sharded: the nodes form a cluster, where room and control channels are shard channels.

    Raises:
        BackendUnavailable: ``first`` cannot be reached within ``command_timeout``.
    """
    with single_error():
        async with trio.open_nursery() as nursery:
            subscription = RedisSubscription(
                nursery,
                connect,
                route,
                timeout=command_timeout,
                ping_interval=ping_interval,
                sharded=sharded,
            )
            try:
                await subscription.connection(first)
                yield subscription
            finally:
                subscription.close()
                nursery.cancel_scope.cancel()


class RedisSubscription:
    """Pub/Sub connections, one per node it needs, read as one stream of messages.

    On a single Redis it holds one connection; on a cluster, one per master owning a channel
    it subscribed (SSUBSCRIBE there), the classic channels on the master ``route`` names for
    them. There is no retry: the first connection lost, or a shard channel the server
    unsubscribed by itself (its slot moved), ends ``messages()`` with BackendUnavailable, and
    the owner opens a new subscription, which finds the nodes anew.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        connect: Callable[[str], resp.Target],
        route: Callable[[str], str],
        *,
        timeout: float,
        ping_interval: float,
        sharded: bool,
    ) -> None:
        self._nursery = nursery
        self._connect = connect
        self._route = route
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._sharded = sharded
        self._connections: dict[str, _Connection] = {}
        self._subscribed: dict[str, _Connection] = {}  # channel -> the connection holding it
        self._opening = trio.Lock()
        # what the connections read and messages() did not take yet. Unbounded: left in the
        # socket, a backlog would get us closed by Redis as a slow subscriber (its
        # client-output-buffer-limit); the hub's probe tells a backlog from a dead pump.
        self._pending: deque[tuple[str, str]] = deque()
        self._arrived = trio.Event()
        self._taken = 0  # messages() taken since its last checkpoint
        self._lost: BaseException | None = None
        self._closed = False

    async def connection(self, node: str) -> _Connection:
        """The open connection to ``node``, opened now if there is none.

        Raises:
            BackendUnavailable: it cannot be opened within the timeout, or the subscription is
                lost already.
        """
        async with self._opening:
            self._check()
            if (connection := self._connections.get(node)) is None:
                connection = _Connection(
                    self._connect(node),
                    node,
                    self._deliver,
                    self._lose,
                    timeout=self._timeout,
                    ping_interval=self._ping_interval,
                    sharded=self._sharded,
                )
                with unavailable(f"Redis at {node}"), trio.fail_after(self._timeout):
                    await self._nursery.start(connection.run)
                self._connections[node] = connection
            return connection

    def _check(self) -> None:
        if self._lost is not None:
            raise BackendUnavailable("the Pub/Sub connection was lost") from self._lost

    def _lose(self, error: BaseException) -> None:
        """One connection is lost, so is the subscription: end ``messages()`` now."""
        if self._lost is None:
            self._lost = error
            self._arrived.set()  # wakes messages()

    def _deliver(self, messages: list[tuple[str, str]]) -> None:
        self._pending.extend(messages)
        self._arrived.set()

    def keep_only(self, nodes: set[str]) -> None:
        """Lose the subscription if it holds a connection to a node not among ``nodes``: on a
        cluster, a master that the slot map no longer lists (its replica took over while it
        was stalled, so its connection may stay open and silent until it wakes)."""
        if gone := sorted(self._connections.keys() - nodes):
            self._lose(BackendUnavailable(f"{', '.join(gone)} no longer a master"))

    def close(self) -> None:
        """Drop every connection, before the tasks that use them are cancelled: Redis drops
        their subscriptions at once, and ``messages()`` ends."""
        self._closed = True
        self._arrived.set()
        for connection in self._connections.values():
            connection.close()

    async def subscribe(self, *channels: str) -> None:
        """Subscribe and return once Redis acknowledged every channel.

        Raises:
            BackendUnavailable: no acknowledgement within the timeout, or a connection is lost;
                the subscription is lost then (what was subscribed is not known).
        """
        nodes: dict[str, list[str]] = {}
        for channel in channels:
            nodes.setdefault(self._route(channel), []).append(channel)
        for node, mine in nodes.items():
            connection = await self.connection(node)
            try:
                await connection.subscribe(mine)
            except BackendUnavailable as exc:
                self._lose(exc)
                raise
            self._subscribed.update(dict.fromkeys(mine, connection))

    async def unsubscribe(self, *channels: str) -> None:
        """Unsubscribe (none given: do nothing) and wait for Redis's acknowledgement.

        Raises:
            BackendUnavailable: no acknowledgement within the timeout, or the connection is lost.
        """
        self._check()
        connections: dict[_Connection, list[str]] = {}
        for channel in channels:
            if (connection := self._subscribed.pop(channel, None)) is not None:
                connections.setdefault(connection, []).append(channel)
        for connection, mine in connections.items():
            await connection.unsubscribe(mine)

    def messages(self) -> AsyncIterator[tuple[str, str]]:
        """``(channel, payload)``, in order per channel; raises BackendUnavailable once a
        connection is lost.

        An iterator rather than an async generator, which trio would warn about when a reader
        stops early.
        """
        return self

    def backlog(self) -> bool:
        """A message is waiting: read, not yet taken."""
        return bool(self._pending)

    def __aiter__(self) -> AsyncIterator[tuple[str, str]]:
        return self

    #: messages taken without a checkpoint at most: a burst must not hold up every other task
    _BURST = 32

    async def __anext__(self) -> tuple[str, str]:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            if self._lost is not None:
                raise BackendUnavailable(
                    f"lost the Pub/Sub connection: {_describe(self._lost)}"
                ) from self._lost
            self._taken = 0
            await self._arrived.wait()
            self._arrived = trio.Event()
        self._taken += 1
        if self._taken >= self._BURST:
            self._taken = 0
            await trio.lowlevel.checkpoint()
        return self._pending.popleft()


class _SlotMoved(Exception):
    """The server unsubscribed a shard channel by itself: its slot moved to another node."""


#: Redis's words for a message and for the acknowledgements, classic and sharded
_MESSAGES = frozenset({"message", "smessage"})
_SUBSCRIBED = frozenset({"subscribe", "ssubscribe"})
_UNSUBSCRIBED = frozenset({"unsubscribe", "sunsubscribe"})


class _Connection:
    """One Pub/Sub connection of a :class:`RedisSubscription`, to one node (:mod:`.resp`).

    Its task reads what Redis pushes and hands the messages that arrived together over as one
    list. The subscriber's tasks write (SUBSCRIBE, UNSUBSCRIBE, PING) in turns, and wait for
    the acknowledgements the reader sees.
    """

    def __init__(
        self,
        server: resp.Target,
        node: str,
        deliver: Callable[[list[tuple[str, str]]], None],
        lose: Callable[[BaseException], None],
        *,
        timeout: float,
        ping_interval: float,
        sharded: bool,
    ) -> None:
        self._server = server
        self._node = node
        self._deliver = deliver
        self._lose = lose
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._sharded = sharded
        self._connection: resp.Connection | None = None
        self._closed = False
        self._writing = trio.Lock()
        self._subscribing: dict[str, trio.Event] = {}  # channel -> set once acknowledged
        self._leaving: dict[str, trio.Event] = {}  # the same for UNSUBSCRIBE

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Hold the connection open and pass its messages on, until cancelled or lost.

        A connection silent for ``ping_interval`` is sent a PING, which must be answered
        within the timeout, so a paused or vanished server is noticed even when nothing is
        published.
        """
        self._connection = connection = await resp.connect(self._server)
        task_status.started()
        try:
            pinged = False
            while True:
                with trio.move_on_after(self._timeout if pinged else self._ping_interval) as quiet:
                    pushed = await connection.receive()
                if not quiet.cancelled_caught:
                    pinged = False
                    if messages := self._read(pushed):
                        self._deliver(messages)
                elif not pinged:
                    await self._write([["PING"]])
                    pinged = True
                else:
                    raise trio.TooSlowError(f"no answer to PING in {self._timeout}s")
        except* (*_UNAVAILABLE, _SlotMoved, ResponseError) as group:
            if not self._closed:  # (closed by the subscription: it ends, nothing is lost)
                self._lose(group)
        finally:
            connection.close()

    def _read(self, pushed: list[Any]) -> list[tuple[str, str]]:
        """The messages among ``pushed``; acknowledgements are noted."""
        messages: list[tuple[str, str]] = []
        for push in pushed:
            if isinstance(push, ResponseError):
                raise push  # e.g. MOVED: SSUBSCRIBE on a node that no longer owns the slot
            if not isinstance(push, list):
                continue  # PONG, to a PING before the first SUBSCRIBE
            kind, channel = push[0], push[1]
            if kind in _MESSAGES:
                messages.append((channel, push[2]))
            elif kind in _SUBSCRIBED:
                if (event := self._subscribing.pop(channel, None)) is not None:
                    event.set()
            elif kind in _UNSUBSCRIBED:
                if (event := self._leaving.pop(channel, None)) is not None:
                    event.set()
                elif kind == "sunsubscribe":
                    raise _SlotMoved(f"{self._node} unsubscribed {channel}: its slot moved")
        return messages

    async def _write(self, commands: list[list[resp.Arg]]) -> None:
        assert self._connection is not None
        async with self._writing:
            await self._connection.send(commands)

    def _commands(self, verb: str, channels: list[str]) -> list[list[resp.Arg]]:
        """``verb`` (SUBSCRIBE or UNSUBSCRIBE) of ``channels``; on a cluster node, the shard
        channels are SSUBSCRIBEd (or SUNSUBSCRIBEd), one command per slot."""
        if not self._sharded:
            return [[verb, *channels]]
        classic: list[resp.Arg] = [c for c in channels if not is_shard_channel(c)]
        slots: dict[int, list[resp.Arg]] = {}
        for channel in channels:
            if is_shard_channel(channel):
                slots.setdefault(hash_slot(channel), []).append(channel)
        commands = [[verb, *classic]] if classic else []
        return commands + [["S" + verb, *mine] for mine in slots.values()]

    async def _ask(
        self, verb: str, channels: list[str], waiting: dict[str, trio.Event]
    ) -> list[str]:
        """Send ``verb`` for ``channels`` and wait for their acknowledgements; the channels
        still unacknowledged after the timeout."""
        events = [waiting.setdefault(channel, trio.Event()) for channel in channels]
        with trio.move_on_after(self._timeout):
            await self._write(self._commands(verb, channels))
            for event in events:
                await event.wait()
        return [channel for channel in channels if channel in waiting]

    def close(self) -> None:
        """Close the connection at once: Redis drops its subscriptions without a word."""
        self._closed = True
        if self._connection is not None:
            self._connection.close()

    async def subscribe(self, channels: list[str]) -> None:
        with unavailable(f"cannot subscribe at {self._node}"):
            if missing := await self._ask("SUBSCRIBE", channels, self._subscribing):
                raise trio.TooSlowError(f"no acknowledgement of SUBSCRIBE {missing[0]}")

    async def unsubscribe(self, channels: list[str]) -> None:
        with unavailable(f"cannot unsubscribe at {self._node}"):
            if await self._ask("UNSUBSCRIBE", channels, self._leaving):
                raise BackendUnavailable(f"no acknowledgement of UNSUBSCRIBE from {self._node}")


@asynccontextmanager
async def open_redis_backend(
    url: str, *, command_timeout: float, ping_interval: float = 5.0, sharded: bool = False
) -> AsyncIterator[RedisBackend]:
    """Connect to Redis at ``url`` (``redis://``, ``rediss://`` or ``unix://``) and PING it.

    Args:
        url: passed to coredis; query arguments such as ``?ssl_ca_certs=`` work.
        command_timeout: the longest any round trip may take, connecting included.
        ping_interval: how long a subscription may stay silent before it checks the server.
        sharded: ``url`` is a node of a Redis Cluster: room and control channels are shard
            channels (SPUBLISH), and commands for other nodes' slots are answered MOVED.

    The backend, its connections and their tasks live in this context and close on exit.

    Raises:
        ConfigError: ``url`` cannot be parsed.
        BackendUnavailable: Redis did not answer the PING within ``command_timeout``.
    """
    with single_error():
        async with trio.open_nursery() as nursery:
            backend = RedisBackend(
                url,
                nursery,
                command_timeout=command_timeout,
                ping_interval=ping_interval,
                sharded=sharded,
            )
            try:
                await backend._open()
                yield backend
            finally:
                backend._close()
                nursery.cancel_scope.cancel()
