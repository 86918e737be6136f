"""A small Python client for trio-chat, used by the tests, the benchmark and the CLI client.

Example::

    async with open_client("ws://127.0.0.1:8765/", token) as chat:
        await chat.join("lobby")
        await chat.send("lobby", {"text": "hi"})
        frame = await chat.receive()   # {"type": "message", ...}
"""

from __future__ import annotations

import itertools
import json
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

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["ChatClient", "ConnectionClosed", "ConnectionRejected", "ServerError", "open_client"]

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
    :meth:`receive`.
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


@asynccontextmanager
async def open_client(
    url: str,
    token: str | None = None,
    *,
    headers: list[tuple[str, str]] | None = None,
    subprotocols: list[str] | None = None,
    max_message_size: int = 1 << 20,
    connect_timeout: float = 10.0,
) -> AsyncIterator[ChatClient]:
    """Connect, wait for ``welcome``, and yield a :class:`ChatClient`; close on exit.

    The token goes in the ``Authorization`` header. Raises trio-websocket's
    ``ConnectionRejected`` (with ``status_code`` and the JSON ``body``) when refused.

    The TCP stream is ours and always closed on exit: trio-websocket's own ``open_websocket``
    leaves it open when the server refuses the upgrade or closes first.
    """
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None:
        raise ValueError(f"not a ws:// URL: {url!r}")
    port = parts.port or 80
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    extra = [(k.encode(), v.encode()) for k, v in headers or []]
    if token is not None:
        extra.append((b"Authorization", f"Bearer {token}".encode()))
    stream = await trio.open_tcp_stream(parts.hostname, port)
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
                finally:
                    with trio.move_on_after(connect_timeout, shield=True):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
