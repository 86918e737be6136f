"""Pre-encoded WebSocket frames, written straight to the socket.

This is the one module that relies on trio-websocket internals (pinned to 0.12.x;
``tests/test_wire.py`` fails loudly if they change):

- ``WebSocketConnection._stream`` is the connection's ``trio.SocketStream``;
- ``WebSocketConnection._stream_lock`` serializes every write trio-websocket makes itself
  (pongs, pings, close frames), and ``_send`` is its only user.

Server frames are not masked, so a message's frame is the same bytes for every recipient: it is
built once (:func:`text_frame`) and handed to each connection's :class:`FrameWriter`, which
writes it with one non-blocking ``os.write`` when the socket can take it and nothing else is
being written, with no task switch; otherwise it queues the frame for its writer task. A frame
partly written that way is finished by the writer before anything else goes out: the writer
inherits the stream lock, which is why ours can be handed from one task to another.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from types import TracebackType

    from trio_websocket import WebSocketConnection

#: most bytes joined into one ``send_all`` by the writer
_BATCH_BYTES = 256 * 1024


def text_frame(payload: str) -> bytes:
    """One final, unmasked text frame (RFC 6455 §5.2) carrying ``payload``."""
    data = payload.encode()
    size = len(data)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + data


class HandoffLock:
    """Stands in for a connection's write lock: ``async with`` and ``locked()`` as before, and
    FIFO, but not tied to a task, so a direct write from the pump can leave it to the writer."""

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    def acquire_nowait(self) -> bool:
        if self._held:
            return False
        self._held = True
        return True

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.acquire_nowait():
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._waiters.park()  # release() hands the lock over: still held, now ours

    def release(self) -> None:
        if not self._waiters.unpark():
            self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class FrameWriter:
    """Writes pre-encoded frames to one connection, in order, queueing at most ``limit``.

    :meth:`write` never blocks; :meth:`run` is the writer task that drains the queue. After
    :meth:`stop`, ``run`` returns once every frame it started (a partial one included) is out;
    frames still queued are dropped.
    """

    def __init__(self, ws: WebSocketConnection, limit: int) -> None:
        stream = ws._stream
        if not isinstance(stream, trio.SocketStream):
            raise TypeError(f"direct writes need a SocketStream, not {type(stream).__name__}")
        self._ws = ws
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._lock = HandoffLock()
        ws._stream_lock = self._lock  # type: ignore[assignment]
        self._limit = limit
        self._queue: deque[bytes | memoryview] = deque()
        self._holding = False  # a frame was partly written; we hold the lock for the writer
        self._wakeup = trio.Event()
        self._stopping = False

    def write(self, frame: bytes) -> bool:
        """Write ``frame`` now if the socket takes it, else queue it.

        Returns:
            False when the queue is full: the client does not keep up.
        """
        if not self._queue and self._ws.closed is None and self._lock.acquire_nowait():
            try:
                sent = os.write(self._fd, frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = len(frame)  # the connection is gone; the reader will notice
            if sent == len(frame):
                self._lock.release()
                return True
            self._holding = True  # the writer finishes this frame before anyone else writes
            self._queue.append(memoryview(frame)[sent:])
            self._wakeup.set()
            return True
        if len(self._queue) >= self._limit:
            return False
        self._queue.append(frame)
        self._wakeup.set()
        return True

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()

    async def run(self) -> None:
        """Drain the queue until :meth:`stop`; see the class docs for what is dropped."""
        while not self._stopping or self._holding:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            if not self._holding:
                await self._lock.acquire()
                self._holding = True
            try:
                await self._stream.send_all(self._take_batch())
            finally:
                self._holding = False
                self._lock.release()

    def _take_batch(self) -> bytes:
        chunks = [self._queue.popleft()]
        size = len(chunks[0])
        while self._queue and size < _BATCH_BYTES:
            chunk = self._queue.popleft()
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
