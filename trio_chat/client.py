"""A small Python client for trio-chat, used by the tests, the benchmark and the CLI client.

One connection::

    async with open_client("ws://127.0.0.1:8765/", token) as chat:
        await chat.join("lobby")
        await chat.send("lobby", {"text": "hi"})
        frame = await chat.receive()   # {"type": "message", ...}

Rooms (SPEC §15): ``presence``, ``receipts`` and the other requests answer with their reply
frame; ``signal`` and ``read`` have no reply when they succeed, so they return once the frame
is written, with the ``ref`` it carried: a refusal comes later through :meth:`~ChatClient.receive`
as an ``error`` frame with that ``ref``. What others do arrives there too, as events::

    await chat.signal("lobby", {"typing": True})   # -> the others: {"type": "signal", ...}
    await chat.read("lobby", frame["id"])          # -> the others: {"type": "read", ...}
    who = await chat.presence("lobby")             # {"type": "presence", "users": [...], ...}
    frame = await chat.receive()   # presence_join, presence_leave, signal, read, error...

A connection that comes back by itself, rejoining its rooms with the last message id it saw
in each, so that nothing said meanwhile is lost (SPEC §11)::

    async with open_reconnecting_client("ws://127.0.0.1:8765/", get_token) as chat:
        await chat.join("lobby")
        frame = await chat.receive()   # messages, live or replayed after a reconnect
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import ssl
from collections import deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from ._errors import single_error
from ._store.history import parse_id

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = [
    "ChatClient",
    "ConnectionClosed",
    "ConnectionRejected",
    "LoggedOut",
    "ReconnectingClient",
    "ServerError",
    "open_client",
    "open_reconnecting_client",
]

logger = logging.getLogger(__name__)

Frame = dict[str, Any]


class ServerError(Exception):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, frame: Frame) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.code: str = frame.get("code", "")
        self.frame = frame


class ChatClient:
    """One connection; requests are matched to replies by ``ref``.

    Frames that arrive while a request waits for its reply are kept, in order, for
    :meth:`receive`: messages, directs, the room events of SPEC §15 (``presence_join``,
    ``presence_leave``, ``signal``, ``read``), and the ``error`` frames that refuse a
    :meth:`signal` or a :meth:`read`.
    """

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.welcome: Frame = {}
        self._pending: deque[Frame] = deque()
        self._refs = itertools.count(1)

    async def send_frame(self, frame: Frame) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def _read(self) -> Frame:
        frame: Frame = json.loads(await self.ws.get_message())
        return frame

    async def receive(self) -> Frame:
        """The next frame from the server (raises ConnectionClosed once it has closed)."""
        return self._pending.popleft() if self._pending else await self._read()

    async def request(self, kind: str, **fields: Any) -> Frame:
        """Send a frame with a fresh ``ref`` and return the reply carrying it.

        Raises:
            ServerError: the reply was an ``error`` frame.
        """
        ref = next(self._refs)
        await self.send_frame({"type": kind, "ref": ref, **fields})
        while True:
            frame = await self._read()
            if frame.get("ref") == ref:
                if frame["type"] == "error":
                    raise ServerError(frame)
                return frame
            self._pending.append(frame)

    async def join(self, room: str) -> Frame:
        return await self.request("join", room=room)

    async def leave(self, room: str) -> Frame:
        return await self.request("leave", room=room)

    async def send(self, room: str, data: Any) -> Frame:
        return await self.request("send", room=room, data=data)

    async def direct(self, to: str, data: Any) -> Frame:
        return await self.request("direct", to=to, data=data)

    async def ping(self) -> Frame:
        return await self.request("ping")

    async def presence(self, room: str) -> Frame:
        """Who is in ``room`` (joined), on every instance: the ``presence`` frame,
        ``{room, users: [{user, info, sessions}], count}``, with ``truncated: true`` when
        more users than it lists are there (SPEC §15).

        Raises:
            ServerError: ``not_in_room``...
        """
        return await self.request("presence", room=room)

    async def receipts(self, room: str) -> Frame:
        """Every user's read marker in ``room`` (joined): the ``receipts`` frame,
        ``{room, read: {user: message id}}``.

        Raises:
            ServerError: ``not_in_room``...
        """
        return await self.request("receipts", room=room)

    async def signal(self, room: str, data: Any) -> int:
        """Send ``data`` (JSON of at most 1 KiB: ``{"typing": true}``...) to the room's other
        sessions, as a ``signal`` event: not stored, not replayed.

        The server answers a signal only to refuse it, so this returns once the frame is
        written, without waiting: a refusal (``rate_limited``, ``forbidden``, ``not_in_room``,
        ``too_large``...) arrives later from :meth:`receive`, as an ``error`` frame whose
        ``ref`` is the one returned here.

        Returns:
            The frame's ``ref``.
        """
        return await self._tell("signal", room=room, data=data)

    async def read(self, room: str, message_id: str) -> int:
        """Mark ``room`` read up to ``message_id``: the room's other sessions, this user's
        other devices included, get a ``read`` event if the marker moved forward (a marker
        that would move back changes nothing and sends nothing).

        No reply when accepted, as :meth:`signal`: a refusal (``bad_request`` for an id
        newer than the room's last message, ``not_in_room``...) comes from :meth:`receive`
        as an ``error`` frame with the returned ``ref``. The server takes a session's frames
        in order, so a later request on this connection (:meth:`receipts`) sees the marker.

        Returns:
            The frame's ``ref``.
        """
        return await self._tell("read", room=room, id=message_id)

    async def _tell(self, kind: str, **fields: Any) -> int:
        """Send a frame that has no reply on success; its ``ref``."""
        ref = next(self._refs)
        await self.send_frame({"type": kind, "ref": ref, **fields})
        return ref


@asynccontextmanager
async def open_client(
    url: str,
    token: str | None = None,
    *,
    headers: list[tuple[str, str]] | None = None,
    subprotocols: list[str] | None = None,
    max_message_size: int = 1 << 20,
    connect_timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ChatClient]:
    """Connect, wait for ``welcome``, and yield a :class:`ChatClient`; close on exit.

    The token goes in the ``Authorization`` header. Raises trio-websocket's
    ``ConnectionRejected`` (with ``status_code`` and the JSON ``body``) when refused.

    ``wss://`` URLs speak TLS, checked with ``ssl_context`` (default: the system's CAs); a
    certificate it does not trust raises ``trio.BrokenResourceError`` from the
    ``ssl.SSLCertVerificationError``.

    The TCP stream is ours and always closed on exit: trio-websocket's own ``open_websocket``
    leaves it open when the server refuses the upgrade or closes first.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or parts.hostname is None:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    extra = [(k.encode(), v.encode()) for k, v in headers or []]
    if token is not None:
        extra.append((b"Authorization", f"Bearer {token}".encode()))
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    stream = await trio.open_tcp_stream(parts.hostname, port)
    if parts.scheme == "wss":
        context = ssl_context or ssl.create_default_context()
        stream = trio.SSLStream(stream, context, server_hostname=parts.hostname)
        try:  # now, so that a certificate we do not trust fails here, not as a silent close
            with trio.fail_after(connect_timeout):
                await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    try:
        with single_error():
            async with trio.open_nursery() as nursery:
                with trio.fail_after(connect_timeout):
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        f"{parts.hostname}:{port}",
                        resource,
                        subprotocols=subprotocols,
                        extra_headers=extra,
                        max_message_size=max_message_size,
                    )
                    client = ChatClient(ws)
                    client.welcome = await client.receive()
                try:
                    yield client
                except trio.Cancelled:
                    # No close handshake: its reply would be read by a task of this nursery,
                    # which is cancelled too. The stream is closed below.
                    nursery.cancel_scope.cancel()
                    raise
                finally:
                    if not nursery.cancel_scope.cancel_called:
                        with trio.move_on_after(connect_timeout, shield=True):
                            await ws.aclose()
                        nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


#: the ``since`` of a room that was empty when joined: the beginning of its stream
ROOM_START = "0-0"
#: close codes after which reconnecting is pointless: logged out, kicked, banned (SPEC §7)
FINAL_CLOSE_CODES = frozenset({4000, 4403})
TOKEN_EXPIRED_CLOSE = 4401


class LoggedOut(Exception):
    """The server ended the session for good (logout, kick, ban, or an expired token with no
    way to get a new one); the client does not reconnect."""

    def __init__(self, code: int) -> None:
        super().__init__(f"closed by the server with {code}")
        self.code = code


class ReconnectingClient:
    """A chat connection that reconnects by itself (see :func:`open_reconnecting_client`).

    It remembers the rooms it joined and, per room, the id of the last message it received
    (at first, the room's last when joined); after a reconnect it joins each again with
    ``since``, so the server replays what was missed, its own sends included. The ``joined``
    replies of those rejoins are handed to :meth:`receive` too: ``recovered: false`` there
    means a gap the server could not fill.

    Presence, signals and read markers (SPEC §15) are as on :class:`ChatClient`, and as in
    the browser client while no connection is up: a :meth:`signal` is dropped, since a typing
    indicator sent late would say something false; a :meth:`read` is kept (the latest per
    room) and sent after the rejoins of the next connection.
    """

    def __init__(
        self,
        url: str,
        token: str | Callable[[], Awaitable[str]],
        *,
        min_delay: float = 0.05,
        max_delay: float = 5.0,
        inbox_size: float = math.inf,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self._token = token
        self._ssl_context = ssl_context
        self._delays = (min_delay, max_delay)
        #: joined rooms -> the last message id seen in each (None: none yet)
        self.rooms: dict[str, str | None] = {}
        #: the welcome of the current connection
        self.welcome: Frame = {}
        #: connections made after the first
        self.reconnects = 0
        self._chat: ChatClient | None = None
        self._connected = trio.Event()
        self._replies: dict[int, trio.MemorySendChannel[Frame]] = {}
        self._refs = itertools.count(1)
        #: read markers asked while disconnected: room -> the latest id, sent on reconnect
        self._reads: dict[str, str] = {}
        self._inbox, self._frames = trio.open_memory_channel[Frame](inbox_size)
        self._ended: LoggedOut | None = None

    async def request(self, kind: str, **fields: Any) -> Frame:
        """Send a frame once connected and return its reply.

        Raises:
            ServerError: the reply was an ``error`` frame.
            ConnectionClosed: the connection dropped before the reply came (the frame may or
                may not have been acted on).
            LoggedOut: the session ended for good.
        """
        while self._chat is None:
            if self._ended is not None:
                raise self._ended
            await self._connected.wait()
        chat, ref = self._chat, next(self._refs)
        send, receive = trio.open_memory_channel[Frame](1)
        self._replies[ref] = send
        try:
            await chat.send_frame({"type": kind, "ref": ref, **fields})
            try:
                reply = await receive.receive()
            except trio.EndOfChannel:
                raise ConnectionClosed(None) from None
        finally:
            del self._replies[ref]
        if reply["type"] == "error":
            raise ServerError(reply)
        return reply

    async def join(self, room: str) -> Frame:
        """Join ``room`` (and rejoin it after every reconnect, from the room's last message
        when joined if nothing is seen here before); the ``joined`` reply, with this user's
        read marker there (``read``) and the number of messages after it (``unread``)."""
        reply = await self.request("join", room=room)
        if self.rooms.get(room) is None and "last" in reply:  # (no "last": history is off)
            # An empty room: a rejoin asks for the whole stream, which the server then sends
            # without vouching for it (recovered: false), since it cannot tell a stream that
            # began after the join from one trimmed since.
            self.rooms[room] = reply["last"] or ROOM_START
        return reply

    async def leave(self, room: str) -> Frame:
        self.rooms.pop(room, None)
        self._reads.pop(room, None)
        return await self.request("leave", room=room)

    async def send(self, room: str, data: Any) -> Frame:
        # The ack's id does not move the rejoin point: a message of someone else's with a
        # lower id may still be on its way (the write delay holds messages, not acks).
        return await self.request("send", room=room, data=data)

    async def direct(self, to: str, data: Any) -> Frame:
        return await self.request("direct", to=to, data=data)

    async def history(self, room: str, **fields: Any) -> Frame:
        return await self.request("history", room=room, **fields)

    async def ping(self) -> Frame:
        return await self.request("ping")

    async def presence(self, room: str) -> Frame:
        """The ``presence`` frame of ``room``: see :meth:`ChatClient.presence`."""
        return await self.request("presence", room=room)

    async def receipts(self, room: str) -> Frame:
        """The ``receipts`` frame of ``room``: see :meth:`ChatClient.receipts`."""
        return await self.request("receipts", room=room)

    async def signal(self, room: str, data: Any) -> int | None:
        """Send a signal if a connection is up (see :meth:`ChatClient.signal`); else drop it.

        Returns:
            The frame's ``ref``, which a refusal (an ``error`` frame from :meth:`receive`)
            carries; ``None`` when no connection was up (or it dropped as the frame was
            written) and the signal is lost.

        Raises:
            LoggedOut: the session ended for good.
        """
        return await self._tell("signal", room=room, data=data)

    async def read(self, room: str, message_id: str) -> int | None:
        """Move this user's read marker in ``room`` (see :meth:`ChatClient.read`); while no
        connection is up, keep the latest id asked per room and send it after the rejoins
        of the next connection (its refusal then comes from :meth:`receive` too). Sending a
        marker twice is harmless: one that does not move changes nothing.

        Returns:
            The frame's ``ref``, which a refusal (an ``error`` frame from :meth:`receive`)
            carries; ``None`` when it waits for the next connection (none was up, or it
            dropped as the frame was written).

        Raises:
            LoggedOut: the session ended for good.
        """
        ref = await self._tell("read", room=room, id=message_id)
        if ref is None:
            kept = self._reads.get(room)
            new, old = parse_id(message_id), parse_id(kept)
            if kept is None or new is None or old is None or new > old:
                self._reads[room] = message_id
        return ref

    async def _tell(self, kind: str, **fields: Any) -> int | None:
        """Send a frame that has no reply on success: its ``ref``, or None when no
        connection is up or it broke as the frame was written."""
        if self._ended is not None:
            raise self._ended
        if self._chat is None:
            return None
        ref = next(self._refs)
        try:
            await self._chat.send_frame({"type": kind, "ref": ref, **fields})
        except ConnectionClosed:
            return None
        return ref

    async def receive(self) -> Frame:
        """The next frame that answers no request: messages (live or replayed), directs,
        the room events (``presence_join``, ``presence_leave``, ``signal``, ``read``), the
        ``error`` frames refusing a :meth:`signal` or :meth:`read`, the ``joined`` of a
        rejoin, ``token_expiring``...

        Raises:
            LoggedOut: the session ended for good, and every frame before that was read.
        """
        try:
            return await self._frames.receive()
        except trio.EndOfChannel:
            assert self._ended is not None
            raise self._ended from None

    def _saw(self, room: str, message_id: str) -> None:
        if room in self.rooms:
            last = self.rooms[room]
            new, old = parse_id(message_id), parse_id(last)
            if last is None or new is None or old is None or new > old:
                self.rooms[room] = message_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and connect again after every close but a final one, with jittered
        exponential backoff; started once the first connection is up. Returns when the
        session has ended for good (:class:`LoggedOut` from :meth:`receive` then)."""
        delay = 0.0
        started = False
        try:
            while True:
                token = self._token if isinstance(self._token, str) else await self._token()
                code = None
                try:
                    async with open_client(self.url, token, ssl_context=self._ssl_context) as chat:
                        delay = 0.0
                        code = await self._serve(chat, task_status if not started else None)
                        started = True
                except (
                    ConnectionClosed,
                    OSError,
                    ConnectionRejected,
                    trio.TooSlowError,
                    trio.BrokenResourceError,  # (a TLS handshake that failed)
                ) as exc:
                    if not started and isinstance(exc, ConnectionRejected):
                        raise  # the first connection tells the caller at once
                    logger.info("connection to %s lost or refused: %r", self.url, exc)
                if code in FINAL_CLOSE_CODES or (
                    code == TOKEN_EXPIRED_CLOSE and isinstance(self._token, str)
                ):
                    self._ended = LoggedOut(code)
                    return
                low, high = self._delays
                delay = min(max(delay * 2, low), high)
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                self.reconnects += 1
        finally:
            if self._ended is None:
                self._ended = LoggedOut(1001)
            self._inbox.close()
            for waiting in self._replies.values():
                waiting.close()

    async def _serve(
        self, chat: ChatClient, task_status: trio.TaskStatus[None] | None
    ) -> int | None:
        """Read one connection's frames until it closes; return the close code."""
        self.welcome = chat.welcome
        rejoins = {}
        for room, since in self.rooms.items():
            ref = next(self._refs)
            rejoins[ref] = room
            join: Frame = {"type": "join", "ref": ref, "room": room}
            await chat.send_frame(join if since is None else {**join, "since": since})
        # after the rejoins: the server takes a session's frames in order
        for room, message_id in list(self._reads.items()):
            if room in self.rooms:
                read = {"type": "read", "ref": next(self._refs), "room": room, "id": message_id}
                await chat.send_frame(read)
        self._reads.clear()
        self._chat = chat
        self._connected.set()
        self._connected = trio.Event()
        if task_status is not None:
            task_status.started()
        try:
            while True:
                frame = await chat.receive()
                answers: int = frame.get("ref", 0)
                if (waiting := self._replies.get(answers)) is not None:
                    waiting.send_nowait(frame)
                    continue
                if rejoins.pop(answers, None) is not None and frame["type"] == "error":
                    logger.warning("rejoin refused: %s", frame)
                if frame.get("type") == "message":
                    self._saw(frame["room"], frame["id"])
                await self._inbox.send(frame)
        except ConnectionClosed as closed:
            return closed.reason.code if closed.reason else None
        finally:
            self._chat = None
            for waiting in list(self._replies.values()):
                waiting.close()


@asynccontextmanager
async def open_reconnecting_client(
    url: str, token: str | Callable[[], Awaitable[str]], **options: Any
) -> AsyncIterator[ReconnectingClient]:
    """Connect a :class:`ReconnectingClient` and yield it once its first connection is up;
    on exit, close it.

    Args:
        url: the ``ws://`` (or ``wss://``) URL.
        token: a JWT, or an async function returning one, called before every connection
            (a token function also lets it reconnect after a 4401, token expired).
        options: ``min_delay``/``max_delay`` (seconds) of the backoff, ``inbox_size``,
            ``ssl_context`` (for ``wss://``).

    Raises:
        ConnectionRejected: the first connection was refused.
    """
    client = ReconnectingClient(url, token, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        yield client
        nursery.cancel_scope.cancel()
