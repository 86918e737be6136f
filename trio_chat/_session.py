"""One connected client: its identity, its rooms, and its bounded outbound queue.

The Pub/Sub pump and the session's own reader hand encoded frames to :meth:`Session.deliver`,
which never blocks: the frame is written to the socket at once when it can take it, else
queued for a drain task of the session (see :mod:`trio_chat._wire`). A full queue means the
client cannot keep up, and the session is closed with 1008.

Closing is asked for with :meth:`Session.close` (from any task, without awaiting). A close task
performs it, so the close frame never interleaves with a half-written message: it waits for the
drain to finish the batch it is writing, the rest of the queue is dropped, then it sends the
last frames it was given (``logout``) and the close frame.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio
from trio_websocket import ConnectionClosed

from ._wire import Cork, FrameWriter, Pong, text_frame

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from trio_websocket import WebSocketConnection

    from ._auth import Identity
    from ._limits import TokenBucket
    from ._messages import JSONValue
    from ._metrics import Metrics
    from ._timers import Timer

logger = logging.getLogger(__name__)

NORMAL = 1000
GOING_AWAY = 1001
POLICY = 1008
INTERNAL_ERROR = 1011


@attrs.frozen
class CloseRequest:
    code: int
    reason: str
    #: frames sent just before the close frame (an ``error``, a ``logout``)
    last_frames: tuple[str, ...] = ()


class Session:
    """A verified, registered client connection owned by this instance."""

    __slots__ = (
        "_close_timeout",
        "_metrics",
        "_nursery",
        "_writer",
        "close_request",
        "connected_at_ms",
        "expiry_timer",
        "frame_bucket",
        "id",
        "identity",
        "info",
        "pong",
        "read_only",
        "refreshes_in_flight",
        "remote",
        "rooms",
        "send_bucket",
        "signal_bucket",
        "user_id",
        "ws",
    )

    def __init__(
        self,
        session_id: str,
        identity: Identity,
        ws: WebSocketConnection,
        *,
        queue_size: int,
        send_bucket: TokenBucket,
        frame_bucket: TokenBucket,
        remote: str,
        metrics: Metrics,
    ) -> None:
        self.id = session_id
        self._metrics = metrics
        self.identity = identity
        self.user_id = identity.user_id
        self.remote = remote
        self.ws = ws
        self.rooms: set[str] = set()
        #: what the connect hook said of the session (SPEC §14), None without one
        self.info: Mapping[str, JSONValue] | None = None
        #: rooms the join hook made read-only (``publish: false``); None while there are none
        self.read_only: set[str] | None = None
        self.connected_at_ms = 0
        self.close_request: CloseRequest | None = None
        #: refresh frames received and not yet answered: expiry waits for them
        self.refreshes_in_flight = 0
        #: the token's pending ``token_expiring`` or deadline timer
        self.expiry_timer: Timer | None = None
        #: set by the pong of the last ping sent, if any
        self.pong: Pong | None = None
        #: ``limits.send_*``: spent by ``send`` and ``direct``
        self.send_bucket = send_bucket
        #: ``limits.frame_*``: spent by every client frame
        self.frame_bucket = frame_bucket
        #: ``limits.signal_*``: spent by ``signal``; made at the first one
        self.signal_bucket: TokenBucket | None = None
        self._writer = FrameWriter(ws, queue_size)
        # The connection's nursery while serve() runs: close() starts its task there, and
        # bounds it with its cancel scope.
        self._nursery: trio.Nursery | None = None
        self._close_timeout = 5.0

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user_id}>"

    @property
    def closing(self) -> bool:
        return self.close_request is not None

    def deliver(self, frame: bytes, cork: Cork | None = None) -> bool:
        """Write or queue one encoded frame (:func:`~trio_chat._wire.text_frame`), never blocking;
        with a ``cork``, possibly held until it is flushed.

        Returns False when the session is closing or was just closed as a slow consumer.
        """
        if self.close_request is not None:
            return False
        if not self._writer.write(frame, cork):
            logger.warning("session %s: outbound queue full, closing slow consumer", self.id)
            self._metrics.slow_consumer()
            self.close(POLICY, "slow consumer")
            return False
        return True

    @property
    def congested(self) -> bool:
        """More than half of the outbound queue is taken: signals are dropped (SPEC §15)."""
        return self._writer.congested

    def reply(self, text: str) -> bool:
        """:meth:`deliver` a frame made for this session alone."""
        if not self.deliver(text_frame(text)):
            return False
        self._metrics.frame_out(text)
        return True

    def reply_all(self, texts: Sequence[str]) -> bool:
        """:meth:`reply` with several frames in one write, which takes one place in the queue
        however many they are (a replay of history)."""
        if not self.deliver(b"".join(map(text_frame, texts))):
            return False
        for text in texts:
            self._metrics.frame_out(text)
        return True

    def start_soon(self, task: Callable[[], Awaitable[object]]) -> bool:
        """Run ``task`` in the connection's nursery: it ends with the connection.

        Returns False (and runs nothing) once the connection is closing or gone.
        """
        if self._nursery is None or self.close_request is not None:
            return False
        self._nursery.start_soon(task)
        return True

    def ping(self) -> None:
        """Send a WebSocket ping; :attr:`pong` is set when it is answered."""
        if self.close_request is None:
            self.pong = self._writer.ping()

    def close(self, code: int, reason: str, *last_frames: str) -> None:
        """Close the connection: the first request wins, and it must finish within the close
        timeout, or the connection is cancelled. Never blocks."""
        if self.close_request is not None:
            return
        self.close_request = CloseRequest(code, reason, last_frames)
        self._writer.stop()
        if self._nursery is not None:
            self._start_close()

    def _start_close(self) -> None:
        assert self._nursery is not None
        scope = self._nursery.cancel_scope
        scope.deadline = min(scope.deadline, trio.current_time() + self._close_timeout)
        self._nursery.start_soon(self._close_connection)

    async def serve(
        self, reader: Callable[[Session], Awaitable[None]], *, close_timeout: float
    ) -> None:
        """Run the reader (and writes, and a requested close) until the connection ends.

        Returns when the client closed, the reader returned, or a requested close completed
        (or ran out of time). Cancellation propagates; the caller cleans up the records.
        """
        self._close_timeout = close_timeout
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._writer.attach(nursery)
            try:
                if self.close_request is not None:  # closed before it started (shutdown)
                    self._start_close()
                try:
                    await reader(self)
                except ConnectionClosed:
                    pass
                if self.close_request is None:
                    # The client went away (or the reader returned): nothing to write.
                    nursery.cancel_scope.cancel()
                # Stay in the body until the close task ends it (by cancelling): a nursery
                # whose body has ended refuses new tasks, and the pump may still deliver.
                await trio.sleep_forever()
            finally:
                # However it ends, still inside the body: from now on deliveries drop.
                self._nursery = None
                self._writer.detach()

    async def _close_connection(self) -> None:
        """Finish the frame being written, then the last frames, then the close frame."""
        request = self.close_request
        nursery = self._nursery  # serve() lets go of it when the close runs out of time
        assert request is not None
        assert nursery is not None
        try:
            await self._writer.wait_idle()
            for frame in request.last_frames:
                await self.ws.send_message(frame)
                self._metrics.frame_out(frame)
            await self.ws.aclose(request.code, request.reason)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone; nothing more to write
        finally:
            nursery.cancel_scope.cancel()
