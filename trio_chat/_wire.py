"""Pre-encoded WebSocket frames, written straight to the socket.

This is the one module that relies on trio-websocket internals (pinned to 0.12.x;
``tests/test_wire.py`` fails loudly if they change):

- ``WebSocketConnection._stream`` is the connection's ``trio.SocketStream`` (a
  ``trio.SSLStream`` over one with ``server.tls_cert``);
- ``WebSocketConnection._stream_lock`` serializes every write trio-websocket makes itself
  (pongs, pings, close frames), and ``_send`` is its only user;
- ``WebSocketConnection._pings`` maps a ping's payload to the event its pong sets;
- once a connection is open, nothing reads what is kept of its opening handshake:
  ``WebSocketRequest._event`` (the request and its headers, the token among them) and
  wsproto's ``WSConnection.handshake`` (the HTTP/1.1 parser; after the upgrade only its
  ``events()``, empty, is called). :func:`forget_handshake` drops them: ~3 KiB per connection;
- ``WebSocketConnection._send`` is how its reader task answers a ping (a pong) or an oversized
  message (a close 1009); :func:`forget_handshake` also makes those answers give way once our
  close frame is out (see :class:`_ServerConnection`).

Server frames are not masked, so a message's frame is the same bytes for every recipient: it is
built once (:func:`text_frame`) and handed to each connection's :class:`FrameWriter`, which
writes it with one non-blocking ``os.write`` when the socket can take it and nothing else is
being written, with no task switch; otherwise it queues the frame for a drain task. A frame
partly written that way is finished by the drain before anything else goes out: the drain
inherits the stream lock, which is why ours can be handed from one task to another. Under TLS
(``server.tls_cert``) the socket's bytes are the TLS stream's to make, so there is no direct
write: every frame is queued for the drain, which sends what waits together through the stream
(bench/README "TLS" measures the difference).
"""

from __future__ import annotations

import logging
import math
import os
import random
import struct
from collections import deque
from typing import TYPE_CHECKING

import trio
from trio_websocket import WebSocketConnection
from wsproto import events
from wsproto.utilities import LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import TracebackType

    from trio_websocket import WebSocketRequest
    from wsproto.events import Event

logger = logging.getLogger(__name__)

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


class _Upgraded:
    """Stands in for wsproto's handshake state once the connection is open."""

    @staticmethod
    def events() -> Iterator[Event]:
        return iter(())


_UPGRADED = _Upgraded()


def forget_handshake(request: WebSocketRequest) -> None:
    """Drop what trio-websocket and wsproto keep of an accepted request, and make its late
    answers give way to our close (see the module docs)."""
    ws = request._connection
    assert ws._wsproto.connection is not None, "only once the connection is open"
    ws._wsproto.handshake = _UPGRADED  # type: ignore[assignment]
    request._event = None  # type: ignore[assignment]
    # The same object and layout, with one method changed: nothing to allocate per connection.
    ws.__class__ = _ServerConnection


class _ServerConnection(WebSocketConnection):
    """A server's open connection whose late answers give way to our close frame."""

    async def _send(self, event: Event) -> None:
        """Send ``event``, but drop a pong or a close that wsproto refuses because our close
        frame is out already.

        trio-websocket's reader answers a ping with a pong, and an oversized message with a
        close 1009, whatever the state; once we have sent our close, wsproto refuses both
        (``LocalProtocolError``), and raised in the reader task the error would end the whole
        handlers' nursery: one client could stop the server (trio-websocket issue #184). After
        our close nothing more is due, so the answer is dropped and the reader goes on to the
        client's close.
        """
        try:
            await super()._send(event)
        except LocalProtocolError:
            if not isinstance(event, events.Pong | events.CloseConnection):
                raise
            logger.debug("%s: no %s after our close", self, type(event).__name__)


class HandoffLock:
    """Stands in for a connection's write lock: ``async with`` and ``locked()`` as before, and
    FIFO, but not tied to a task, so a direct write from the pump can leave it to the writer."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: trio.lowlevel.ParkingLot | None = None  # made at the first wait

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
            if self._waiters is None:
                self._waiters = trio.lowlevel.ParkingLot()
            await self._waiters.park()  # release() hands the lock over: still held, now ours

    def release(self) -> None:
        if self._waiters is None or not self._waiters.unpark():
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


class Pong:
    """Whether a ping was answered: a flag trio-websocket sets, lighter than a trio.Event."""

    __slots__ = ("answered",)

    def __init__(self) -> None:
        self.answered = False

    def set(self) -> None:
        self.answered = True


class Cork:
    """Holds the direct writes of a burst (the Pub/Sub pump reading a backlog) so that each
    connection gets one ``write`` for the whole burst instead of one per message.

    With a ``delay``, the cork flushes at most once per ``delay`` seconds while what it holds
    reaches many connections (:attr:`WIDE`): a burst that ends sooner after the last flush is
    held until then (by :meth:`run`), joined with whatever arrives meanwhile, for at most
    ``delay`` of added latency. Under a steady stream to a large room, each connection gets
    one write per ``delay`` instead of one per message. Bursts for fewer connections flush at
    once unless a wide one is already waiting (they then go with it), and so does the first
    burst after ``delay`` without a flush.
    """

    #: frames one connection may hold before its cork is flushed early
    LIMIT = 64
    #: connections a burst must reach before ``delay`` applies to it: below that, holding it
    #: saves a few syscalls and costs latency
    WIDE = 16

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self._held: set[FrameWriter] = set()
        self._last_flush = -math.inf
        self._due = trio.Event()  # set when a flush waits for its time

    def add(self, writer: FrameWriter) -> None:
        self._held.add(writer)
        if len(writer._corked) >= self.LIMIT:
            self._held.discard(writer)
            writer.uncork()

    def release(self) -> None:
        """The burst has ended: flush now, or once ``delay`` has passed since the last flush."""
        if not self._held:
            return
        if len(self._held) < self.WIDE or trio.current_time() >= self._last_flush + self.delay:
            self.flush()
        else:
            self._due.set()

    def flush(self) -> None:
        if self._due.is_set():
            self._due = trio.Event()
        if not self._held:
            return
        held, self._held = self._held, set()
        for writer in held:
            writer.uncork()
        self._last_flush = trio.current_time()

    async def run(self) -> None:
        """Do the flushes :meth:`release` put off, when their time comes; runs until cancelled."""
        while True:
            await self._due.wait()
            await trio.sleep_until(self._last_flush + self.delay)
            if trio.current_time() >= self._last_flush + self.delay:
                self.flush()  # else one happened meanwhile: wait for the next release()


class FrameWriter:
    """Writes pre-encoded frames to one connection, in order, queueing at most ``limit``.

    :meth:`write` never blocks. Queued frames are drained by a task spawned into the nursery
    given to :meth:`attach`, only while there is something to drain, so an idle connection
    costs no writer task. After :meth:`stop`, the drain finishes the batch it is writing (at
    most 256 KiB of whole frames, a partly written one included) and drops the rest;
    :meth:`wait_idle` waits for that. Once trio-websocket has sent or received a close, no
    data frame follows it.
    """

    def __init__(self, ws: WebSocketConnection, limit: int) -> None:
        stream = ws._stream
        self._ws = ws
        self._stream: trio.abc.Stream = stream
        # Direct writes go to a plain socket's descriptor. Under TLS the bytes on the socket
        # are the TLS stream's to make: every frame goes through it, by the drain task.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._lock = HandoffLock()
        ws._stream_lock = self._lock  # type: ignore[assignment]
        self._nursery: trio.Nursery | None = None  # where drains run, once attached
        self._limit = limit
        # frames waiting for a drain; an empty deque costs 600 bytes, so it is made when needed
        self._queue: deque[bytes | memoryview] | None = None
        self._corked: list[bytes] = []  # held by a Cork, written at its flush
        self._holding = False  # a frame was partly written; we hold the lock for the drain
        self._draining = False
        self._idle: trio.Event | None = None  # set when a drain ends; made only when needed
        self._stopping = False

    def write(self, frame: bytes, cork: Cork | None = None) -> bool:
        """Write ``frame`` now if the socket takes it, else queue it.

        With a ``cork``, a frame that would be written now is held instead, joined with the
        next ones, until the cork is flushed: one write for a burst of messages.

        Returns:
            False when the queue is full: the client does not keep up.
        """
        if self._stopping:
            return True  # closing: nothing more goes out, and that is not the client's fault
        if cork is not None and not self._queue:
            self._corked.append(frame)
            cork.add(self)
            return True
        if self._corked:
            self.uncork()  # what was held goes first
        return self._write(frame)

    @property
    def congested(self) -> bool:
        """Whether more than half of the queue is taken: what can be dropped should be."""
        return self._queue is not None and 2 * len(self._queue) > self._limit

    def uncork(self) -> None:
        """Write what the cork held, joined into one frame sequence."""
        if self._corked and not self._stopping:
            data = self._corked[0] if len(self._corked) == 1 else b"".join(self._corked)
            self._corked.clear()
            self._write(data)  # never over the limit: the queue was empty when they were held

    def _write(self, frame: bytes) -> bool:
        if self._fd is None:  # TLS: through the stream
            if self._queue is not None and len(self._queue) >= self._limit:
                return False
            self._enqueue(frame)
            self._start_drain()
            return True
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
            self._holding = True  # the drain finishes this frame before anyone else writes
            self._enqueue(memoryview(frame)[sent:])
        elif self._queue is not None and len(self._queue) >= self._limit:
            return False
        else:
            self._enqueue(frame)
        self._start_drain()
        return True

    def _enqueue(self, frame: bytes | memoryview) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(frame)

    def attach(self, nursery: trio.Nursery) -> None:
        """Run drains in ``nursery`` from now on (frames queued before wait for this)."""
        self._nursery = nursery
        if self._queue:
            self._start_drain()

    def detach(self) -> None:
        """The nursery is closing: drop whatever is written from now on."""
        self._stopping = True
        self._nursery = None
        self._queue = None
        self._corked.clear()

    def _start_drain(self) -> None:
        if not self._draining and self._nursery is not None:
            self._draining = True
            self._nursery.start_soon(self._drain)

    def ping(self) -> Pong:
        """Send a WebSocket ping in order with the frames; the result is set by its pong.

        (trio-websocket's reader calls ``set()`` on what it finds in ``_pings`` when a pong
        arrives; ``ws.ping()`` would need a task per ping to wait for it.)
        """
        payload = struct.pack("!I", random.getrandbits(32))
        while payload in self._ws._pings:
            payload = struct.pack("!I", random.getrandbits(32))
        pong = Pong()
        self._ws._pings[payload] = pong  # type: ignore[assignment]
        self.write(bytes((0x89, len(payload))) + payload)
        return pong

    def stop(self) -> None:
        self._stopping = True
        self._corked.clear()

    async def wait_idle(self) -> None:
        """Return once no drain is running (after :meth:`stop`: once it has let go)."""
        if self._draining:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def _drain(self) -> None:
        try:
            while self._queue and (not self._stopping or self._holding):
                if self._ws.closed is not None and not self._holding:
                    break  # trio-websocket has sent or received a close: no data after it
                if not self._holding:
                    await self._lock.acquire()
                    self._holding = True
                try:
                    await self._stream.send_all(self._take_batch())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._stopping = True  # the peer is gone; the reader sees it and ends
                finally:
                    self._holding = False
                    self._lock.release()
        finally:
            if self._stopping or self._ws.closed is not None or not self._queue:
                self._queue = None
            self._draining = False
            if self._idle is not None:
                self._idle.set()
                self._idle = None

    def _take_batch(self) -> bytes:
        assert self._queue
        chunks = [self._queue.popleft()]
        size = len(chunks[0])
        while self._queue and size < _BATCH_BYTES:
            chunk = self._queue.popleft()
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
