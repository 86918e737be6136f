"""Connections to Redis spoken to directly: commands packed in RESP2, replies read by
coredis's parser, on a trio stream, in the task that waits for them.

These carry the batches of :class:`~trio_chat._store.redis.RedisBackend` and its Pub/Sub, where
coredis's own paths cost more than the round trips they make: a coredis pipeline builds a
command object per command through its argument checks, opens an anyio task group and cancel
scopes, and hands the bytes to a writer task and the replies back from a reader task (three task
switches and ~0.3 ms of CPU per pipeline), and its PubSub hands each message over two more
(bench/README "Round 4"). The URL is still read by coredis (:func:`target`), and its compiled
parser reads the replies, with its error classes (``MOVED``, ``NOSCRIPT``, ``WRONGTYPE``...).

A connection has one reader and one writer at a time, and a round trip that did not end (a
timeout, a cancellation, a lost connection) leaves it unusable: its owner closes it and opens
another.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING, Any

import attrs
import trio
from coredis.connection import UnixDomainSocketConnection
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import InvalidResponse, RedisError, ResponseError
from coredis.parser import NotEnoughData, Parser

if TYPE_CHECKING:
    import ssl
    from collections.abc import Sequence

    import coredis

#: what a command's arguments may be
Arg = str | bytes | int | float

#: bytes asked of the socket per read
_RECEIVE = 64 * 1024


class NotConnected(RedisConnectionError):
    """The connection could not be made: nothing was sent."""


@attrs.frozen
class Target:
    """Where a Redis server is and how to log in, as coredis read it from the URL."""

    host: str = ""
    port: int = 0
    path: str = ""  # a unix socket
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: ssl.SSLContext | None = None


def target(client: coredis.Redis[Any]) -> Target:
    """The server ``client`` (made from a URL, never connected) would talk to."""
    pool = client.connection_pool
    options = pool.connection_kwargs
    username, password = options.get("username"), options.get("password")
    db = int(options.get("db") or 0)
    location: Any = pool.location  # coredis's TCPLocation or UnixDomainSocketLocation
    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        return Target(path=location.path, username=username, password=password, db=db)
    return Target(
        location.host,
        int(location.port),
        username=username,
        password=password,
        db=db,
        tls=options.get("ssl_context"),
    )


def _encode(arg: Arg) -> bytes:
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, float):
        return repr(arg).encode()  # what Redis's strtod reads back exactly; inf, -inf too
    return b"%d" % arg


def pack(commands: Sequence[Sequence[Arg]]) -> bytes:
    """``commands`` as one RESP2 request."""
    parts: list[bytes] = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = _encode(arg)
            parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


class Connection:
    """A connected stream and the parser of its replies; open one with :func:`connect`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._parser = Parser()
        self._poll = select.poll()
        self._poll.register(_socket(stream).fileno(), select.POLLIN)

    def closed(self) -> bool:
        """Whether Redis closed the connection (or broke it) while it was idle.

        Unasked, Redis sends nothing, so an idle connection with something to read has been
        closed (a Redis that went away): a round trip on it would have to be reported as
        "maybe ran", where a new connection's refusal says for sure that nothing was sent.
        """
        return bool(self._poll.poll(0))

    async def round_trip(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send ``commands`` at once and read a reply to each: strings decoded, an error reply
        as its coredis exception (a :class:`~coredis.exceptions.ResponseError`), not raised.

        Raises:
            coredis.exceptions.ConnectionError: Redis closed the connection, answered what is
                not RESP, or answered that it cannot serve (``LOADING``).
            trio.BrokenResourceError, OSError: the connection broke.
        """
        await self.send(commands)
        replies: list[Any] = []
        while len(replies) < len(commands):
            replies += await self.receive(len(commands) - len(replies))
        return replies

    async def send(self, commands: Sequence[Sequence[Arg]]) -> None:
        """Write ``commands``; one task at a time (trio raises BusyResourceError otherwise)."""
        await self._stream.send_all(pack(commands))

    async def receive(self, most: int = 1 << 30) -> list[Any]:
        """At least one reply, and at most ``most``: those that came together (a Pub/Sub
        connection's messages arrive so). Raises as :meth:`round_trip`."""
        replies: list[Any] = []
        while len(replies) < most:
            try:
                parsed = self._parser.parse(True, "utf-8")
            except InvalidResponse as exc:
                raise RedisConnectionError(f"not RESP: {exc}") from exc
            if isinstance(parsed, NotEnoughData):
                if replies:
                    break
                data = await self._stream.receive_some(_RECEIVE)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                self._parser.feed(bytes(data))
                continue
            reply = parsed[1]
            if isinstance(reply, RedisError) and not isinstance(reply, ResponseError):
                raise reply  # LOADING and the like: the server, not this command
            replies.append(reply)
        return replies

    def close(self) -> None:
        """Close at once (no TLS goodbye): what is in flight is abandoned."""
        _socket(self._stream).close()


def _socket(stream: trio.abc.Stream) -> trio.socket.SocketType:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket


async def connect(server: Target) -> Connection:
    """Open a connection to ``server``, log in (AUTH, SELECT) and PING it: a connection is
    known to be answered before anything is sent on it.

    Raises:
        NotConnected: the server could not be reached or refused the login.
    """
    try:
        stream: trio.abc.Stream
        if server.path:
            stream = await trio.open_unix_socket(server.path)
        else:
            stream = await trio.open_tcp_stream(server.host, server.port)
    except OSError as exc:
        raise NotConnected(f"Unable to establish a connection: {exc}") from exc
    if server.tls is not None:
        stream = trio.SSLStream(stream, server.tls, server_hostname=server.host)
    connection = Connection(stream)
    handshake: list[list[Arg]] = []
    if server.password is not None:
        handshake.append(["AUTH", server.username or "default", server.password])
    if server.db:
        handshake.append(["SELECT", server.db])
    handshake.append(["PING"])
    try:
        for reply in await connection.round_trip(handshake):
            if isinstance(reply, ResponseError):
                raise NotConnected(f"refused: {reply}") from reply
    except (OSError, trio.BrokenResourceError, RedisConnectionError) as exc:
        connection.close()
        if isinstance(exc, NotConnected):
            raise
        raise NotConnected(f"Unable to establish a connection: {exc}") from exc
    except BaseException:
        connection.close()
        raise
    return connection
