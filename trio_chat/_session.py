"""One connected client: its identity, its rooms, and its bounded outbound queue.

The Pub/Sub pump and the session's own reader hand encoded frames to :meth:`Session.deliver`,
which never blocks: the frame is written to the socket at once when it can take it, else
queued for the session's writer task (see :mod:`trio_chat._wire`). A full queue means the
client cannot keep up, and the session is closed with 1008.

Closing is asked for with :meth:`Session.close` (from any task, without awaiting). The writer
performs it, so the close frame never interleaves with a half-written message: it finishes the
frame it is writing, drops the rest of the queue, sends the last frames it was given
(``logout``), then the close frame.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio
from trio_websocket import ConnectionClosed

from ._wire import FrameWriter, text_frame

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio_websocket import WebSocketConnection

    from ._auth import Identity
    from ._limits import TokenBucket
    from ._metrics import Metrics

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

    def __init__(
        self,
        session_id: str,
        identity: Identity,
        ws: WebSocketConnection,
        *,
        queue_size: int,
        bucket: TokenBucket,
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
        self.connected_at_ms = 0
        self.close_request: CloseRequest | None = None
        #: set (and replaced) whenever a refresh changes the identity; wakes the expiry watch
        self.identity_changed = trio.Event()
        #: refresh frames received and not yet answered: expiry waits for them
        self.refreshes_in_flight = 0
        self.bucket = bucket
        self._writer = FrameWriter(ws, queue_size)
        # The scope of the whole connection, set by run(); close() gives it a deadline.
        self._scope: trio.CancelScope | None = None
        self._close_timeout = 5.0

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user_id}>"

    @property
    def closing(self) -> bool:
        return self.close_request is not None

    def deliver(self, frame: bytes) -> bool:
        """Write or queue one encoded frame (:func:`~trio_chat._wire.text_frame`), never blocking.

        Returns False when the session is closing or was just closed as a slow consumer.
        """
        if self.close_request is not None:
            return False
        if not self._writer.write(frame):
            logger.warning("session %s: outbound queue full, closing slow consumer", self.id)
            self._metrics.slow_consumer()
            self.close(POLICY, "slow consumer")
            return False
        return True

    def reply(self, text: str) -> bool:
        """:meth:`deliver` a frame made for this session alone."""
        if not self.deliver(text_frame(text)):
            return False
        self._metrics.frame_out(text)
        return True

    def close(self, code: int, reason: str, *last_frames: str) -> None:
        """Ask the writer to close the connection; the first request wins.

        The close must finish within the close timeout, or the connection is cancelled.
        """
        if self.close_request is not None:
            return
        self.close_request = CloseRequest(code, reason, last_frames)
        self._writer.stop()
        if self._scope is not None:
            self._scope.deadline = min(
                self._scope.deadline, trio.current_time() + self._close_timeout
            )

    async def serve(
        self,
        reader: Callable[[Session], Awaitable[None]],
        *watchers: Callable[[Session], Awaitable[None]],
        close_timeout: float,
    ) -> None:
        """Run the reader, the writer and the ``watchers`` until the connection ends.

        Returns when the client closed, the reader returned, or a requested close completed
        (or ran out of time). Watchers (token expiry, pings) run beside the reader and end
        with it. Cancellation propagates; the caller cleans up the records.
        """
        self._close_timeout = close_timeout
        with trio.CancelScope() as self._scope:
            if self.close_request is not None:  # closed before it started (e.g. shutdown)
                self._scope.deadline = trio.current_time() + close_timeout
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_then_close, nursery.cancel_scope)
                for watcher in watchers:
                    nursery.start_soon(watcher, self)
                try:
                    await reader(self)
                except ConnectionClosed:
                    pass
                if self.close_request is None:
                    # The client went away (or the reader returned): nothing left to write.
                    nursery.cancel_scope.cancel()

    async def _write_then_close(self, connection_scope: trio.CancelScope) -> None:
        try:
            await self._writer.run()
            request = self.close_request
            assert request is not None  # the writer only stops when a close was asked for
            for frame in request.last_frames:
                await self.ws.send_message(frame)
                self._metrics.frame_out(frame)
            await self.ws.aclose(request.code, request.reason)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone; nothing more to write
        finally:
            connection_scope.cancel()
