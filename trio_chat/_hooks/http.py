"""The hooks over HTTP, for ``trio-chat serve`` (SPEC §14): each hook a signed ``POST``.

``POST <hooks.url>/<hook>`` with the event as a JSON body and ``X-Trio-Chat-Timestamp`` and
``X-Trio-Chat-Signature: sha256=<HMAC-SHA256 of "<timestamp>.<body>">``, so the application
can tell trio-chat from anyone else who reaches it and refuse a replayed request.

HTTP/1.1 is spoken with h11 (the protocol library under httpcore and hypercorn) over Trio
streams, on connections kept alive in a pool: at most ``hooks.max_concurrency`` calls in
flight, more wait within ``hooks.timeout``. Not httpx: on Trio (through anyio and httpcore)
it cost 700-930 µs of CPU per call where this costs about 130 (bench/README.md, "Hooks"), and
a hook is called for every message. An idle connection the application closed is noticed
before it is used (its socket is readable), and a call that fails on a reused connection
before any answer came is made once more on a new one. The answer is read up to a bound, so a
misbehaving application cannot make an instance buffer megabytes. No redirects, no proxies.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import time
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs
import h11
import trio

from .._messages import dumps, loads
from .caller import HookFailed
from .events import KEEP, Allow, Answer, Deny

if TYPE_CHECKING:
    from .._config import HooksConfig
    from .caller import Hook
    from .events import Event

#: bytes of an answer beyond what its ``data`` may take (the rest of the JSON, ``info``...)
_ANSWER_SLACK = 8192
#: bytes read from the socket at a time
_READ_SIZE = 65536
#: what a connection can fail with (the application went away, or spoke no HTTP/1.1)
_BROKEN = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Trio-Chat-Signature`` value of a request (the application computes the same)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class HttpHooks:
    """A pool of kept-alive HTTP/1.1 connections to the application; :meth:`aclose` it.

    Args:
        config: the ``[hooks]`` section (``url`` and ``secret`` set).
        instance_id: sent as ``X-Trio-Chat-Instance``.
        max_message_bytes: the largest message; an answer may carry one, JSON-escaped.
    """

    def __init__(self, config: HooksConfig, instance_id: str, max_message_bytes: int) -> None:
        assert config.url is not None
        assert config.secret is not None
        url = urlsplit(config.url)
        self._host = url.hostname or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._path = url.path.rstrip("/")
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._headers = [
            ("Host", url.netloc),
            ("Content-Type", "application/json"),
            ("X-Trio-Chat-Instance", instance_id),
        ]
        self._secret = config.secret
        self._calls = config.calls
        self._max_answer = 2 * max_message_bytes + _ANSWER_SLACK
        self._slots = trio.Semaphore(config.max_concurrency)
        self._idle: list[_Connection] = []

    async def aclose(self) -> None:
        """Close the idle connections (those in use are closed by their calls)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.aclose()

    def hooks(self) -> dict[str, Hook]:
        """The callables of the hooks listed in ``hooks.calls``."""
        return {name: partial(self.call, name) for name in self._calls}

    async def call(self, name: str, event: Event) -> Answer | None:
        """POST ``event`` to the application's ``name`` hook and read its answer.

        Returns:
            The answer; None for ``disconnect``, whose body is not looked at.

        Raises:
            HookFailed: unreachable, not 200, too large, or not a valid answer.
        """
        body = dumps(attrs.asdict(event)).encode()
        timestamp = str(int(time.time()))
        headers = [
            *self._headers,
            ("Content-Length", str(len(body))),
            ("X-Trio-Chat-Timestamp", timestamp),
            ("X-Trio-Chat-Signature", signature(self._secret, timestamp, body)),
        ]
        request = h11.Request(method="POST", target=f"{self._path}/{name}", headers=headers)
        async with self._slots:
            status, raw = await self._exchange(request, body, name)
        if status != 200:
            raise HookFailed(f"POST /{name}: HTTP {status}")
        return None if name == "disconnect" else parse_answer(raw)

    async def _exchange(self, request: h11.Request, body: bytes, name: str) -> tuple[int, bytes]:
        """One request and its answer, on an idle connection or a new one."""
        try:
            while self._idle:
                connection = self._idle.pop()
                if not connection.usable():
                    await connection.aclose()
                    continue
                try:
                    return await self._on(connection, request, body)
                except _Unanswered:
                    break  # closed while idle, and we were the first to see: once more
            return await self._on(await self._connect(), request, body)
        except (_Unanswered, *_BROKEN) as exc:
            raise HookFailed(f"POST /{name}: {exc}") from None
        except _TooLarge:
            raise HookFailed(f"POST /{name}: answer over {self._max_answer} bytes") from None

    async def _connect(self) -> _Connection:
        if self._ssl is None:
            stream: trio.abc.Stream = await trio.open_tcp_stream(self._host, self._port)
        else:
            stream = await trio.open_ssl_over_tcp_stream(
                self._host, self._port, ssl_context=self._ssl
            )
        return _Connection(stream)

    async def _on(
        self, connection: _Connection, request: h11.Request, body: bytes
    ) -> tuple[int, bytes]:
        try:
            answer = await connection.exchange(request, body, self._max_answer)
        except BaseException:  # broken, too large, or cancelled midway: never reused
            await connection.aclose()
            raise
        if connection.reuse():
            self._idle.append(connection)
        else:
            await connection.aclose()
        return answer


class _Unanswered(Exception):
    """The connection broke before any byte of an answer came."""


class _TooLarge(Exception):
    """The answer is over the bound."""


class _Connection:
    """One HTTP/1.1 connection to the application: h11's state machine over a Trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._h11 = h11.Connection(h11.CLIENT)

    def usable(self) -> bool:
        """False when the application closed it (or sent something) while it was idle."""
        stream = self._stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return not stream.socket.is_readable()

    async def exchange(self, request: h11.Request, body: bytes, limit: int) -> tuple[int, bytes]:
        """Send ``request`` with ``body``; the answer's status and body (at most ``limit``).

        Raises:
            _Unanswered: the connection broke before the answer began.
            _TooLarge: the body is over ``limit`` bytes.
            OSError, trio.BrokenResourceError, h11.ProtocolError: it broke later.
        """
        send = self._h11.send
        data = send(request) + send(h11.Data(data=body)) + send(h11.EndOfMessage())
        status: int | None = None
        answer = bytearray()
        try:
            await self._stream.send_all(data)
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    self._h11.receive_data(bytes(await self._stream.receive_some(_READ_SIZE)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    answer += event.data
                    if len(answer) > limit:
                        raise _TooLarge
                elif isinstance(event, h11.EndOfMessage):
                    assert status is not None
                    return status, bytes(answer)
                elif isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("connection closed before the answer ended")
        except _BROKEN as exc:
            if status is None:
                raise _Unanswered(f"{type(exc).__name__}: {exc}") from exc
            raise

    def reuse(self) -> bool:
        """Ready the connection for the next request; False when it cannot take one."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            return True
        return False

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


def parse_answer(raw: bytes) -> Answer:
    """``{"allow": true, ...}`` or ``{"allow": false, "reason": ...}``, as an answer.

    Raises:
        HookFailed: not a JSON object with a boolean ``allow`` and fields of the right types.
    """
    try:
        body = loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HookFailed(f"answer is not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("allow"), bool):
        raise HookFailed('answer is not a JSON object with a boolean "allow"')
    if not body["allow"]:
        reason = body.get("reason", "denied by the application")
        if not isinstance(reason, str):
            raise HookFailed('"reason" is not a string')
        return Deny(reason)
    rooms = body.get("rooms", [])
    if not isinstance(rooms, list):
        raise HookFailed('"rooms" is not a list')
    info = body.get("info")
    if info is not None and not isinstance(info, dict):
        raise HookFailed('"info" is not an object')
    return Allow(
        info=info,
        rooms=tuple(rooms),
        publish=body.get("publish", True),
        data=body["data"] if "data" in body else KEEP,
    )
