"""The direct frame writer, and the trio-websocket internals it relies on.

If trio-websocket changes what ``_wire`` depends on, the first tests here fail loudly: pin the
version back, or adapt ``trio_chat/_wire.py`` (the only module that knows those internals).
"""

from __future__ import annotations

import inspect
import json
from functools import partial

import pytest
import trio
import trio.lowlevel
import trio_websocket
import wsproto
import wsproto.handshake
from trio_websocket import (
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)
from wsproto.frame_protocol import FrameProtocol

from trio_chat import _wire as wire
from trio_chat._wire import Cork, FrameWriter, HandoffLock, text_frame


def test_trio_websocket_internals_are_what_wire_expects():
    assert trio_websocket.__version__.startswith("0.12."), (
        "trio-websocket changed version: check trio_chat/_wire.py against its internals"
    )
    init = inspect.getsource(WebSocketConnection.__init__)
    assert "self._stream = stream" in init
    assert "self._stream_lock = trio.StrictFIFOLock()" in init
    send = inspect.getsource(WebSocketConnection._send)
    assert "async with self._stream_lock:" in send
    assert "await self._stream.send_all(data)" in send
    # _send must be the only user of the lock: every write trio-websocket makes goes through it
    source = inspect.getsource(trio_websocket._impl)
    assert source.count("_stream_lock") == 2
    assert source.count("self._stream.send_all") == 1
    # forget_handshake: after the upgrade, wsproto consults its handshake only for events(),
    # and trio-websocket reads the request only before accepting
    events = inspect.getsource(wsproto.WSConnection.events)
    assert "yield from self.handshake.events()" in events
    for method in (wsproto.WSConnection.send, wsproto.WSConnection.receive_data):
        assert "if self.connection is None:" in inspect.getsource(method)
    assert "self._event = event" in inspect.getsource(WebSocketRequest.__init__)
    assert source.count("self._event") == 5


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_text_frame_is_the_frame_wsproto_would_send(size):
    payload = "é" * (size // 2) + "x" * (size % 2)
    expected = FrameProtocol(client=False, extensions=[]).send_data(payload, fin=True)
    assert text_frame(payload) == expected


async def test_handoff_lock_passes_ownership_in_fifo_order():
    lock = HandoffLock()
    order = []

    async def worker(name: str) -> None:
        async with lock:
            order.append(name)
            await trio.sleep(0.01)

    assert lock.acquire_nowait()
    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(worker, name)
            await trio.testing.wait_all_tasks_blocked()
        lock.release()  # handed to "a", not freed
        assert lock.locked()
    assert order == ["a", "b", "c"]
    assert not lock.locked()


async def test_frames_stay_whole_and_ordered_under_backpressure_and_pings(nursery):
    """Big and small frames written directly while the client is not reading, with
    trio-websocket writing pings of its own in between: all arrive whole, in order."""
    sizes = [10, 100_000, 3, 70_000, 126, 65_536, 1] * 60
    queued = []
    pongs = []

    async def handler(request) -> None:
        ws = await request.accept()
        writer = FrameWriter(ws, limit=len(sizes) + 1)
        async with trio.open_nursery() as inner:
            writer.attach(inner)
            for n, size in enumerate(sizes):
                assert writer.write(text_frame(json.dumps([n, "x" * size])))
                queued.append(len(writer._queue or ()))
                if n % 50 == 0:
                    inner.start_soon(ws.ping)  # written by trio-websocket itself
                    await trio.lowlevel.checkpoint()
                if n % 70 == 0:
                    pongs.append(writer.ping())  # written in line with our frames
            assert await ws.get_message() == "bye"  # the client read everything
            await writer.wait_idle()
            assert all(pong.answered for pong in pongs)
            inner.cancel_scope.cancel()

    server = await nursery.start(
        partial(serve_websocket, handler, "127.0.0.1", 0, None, max_message_size=1 << 20)
    )
    with trio.fail_after(20):
        async with open_websocket_url(
            f"ws://127.0.0.1:{server.port}/", max_message_size=1 << 20
        ) as client:
            await trio.sleep(0.3)  # not reading: the server's socket fills and frames queue
            for n, size in enumerate(sizes):
                assert json.loads(await client.get_message()) == [n, "x" * size]
            await client.send_message("bye")
    assert max(queued) > 10  # the queue and the partial-write handoff were really exercised


async def test_a_cork_joins_a_burst_into_one_write_and_keeps_order(nursery, monkeypatch):
    writes = []
    real_write = wire.os.write

    def counting_write(fd, data):
        writes.append(len(data))
        return real_write(fd, data)

    async def handler(request) -> None:
        ws = await request.accept()
        writer = FrameWriter(ws, limit=100)
        cork = Cork()
        async with trio.open_nursery() as inner:
            writer.attach(inner)
            monkeypatch.setattr(wire.os, "write", counting_write)
            for n in range(3):
                assert writer.write(text_frame(f"burst {n}"), cork)
            assert writes == []  # held
            cork.flush()
            assert len(writes) == 1  # one write for the burst
            writer.write(text_frame("held"), cork)
            writer.write(text_frame("direct"))  # a plain write lets the held frame out first
            assert len(writes) == 3
            cork.flush()  # nothing left to write
            assert len(writes) == 3
            assert await ws.get_message() == "bye"
            inner.cancel_scope.cancel()

    server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", 0, None))
    with trio.fail_after(10):
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as client:
            got = [await client.get_message() for _ in range(5)]
            await client.send_message("bye")
    assert got == ["burst 0", "burst 1", "burst 2", "held", "direct"]


class _Held:
    """Stands in for a FrameWriter: what a Cork needs of one."""

    def __init__(self, flushes: list[float]) -> None:
        self._corked: list[bytes] = []
        self._flushes = flushes

    def uncork(self) -> None:
        self._corked.clear()
        self._flushes.append(trio.current_time())


async def test_a_cork_with_a_delay_writes_a_wide_stream_once_per_delay(autojump_clock):
    flushes: list[float] = []
    wide = [_Held(flushes) for _ in range(Cork.WIDE)]
    narrow = [_Held(flushes) for _ in range(Cork.WIDE - 1)]
    cork = Cork(delay=0.005)

    def burst(writers) -> None:
        for writer in writers:
            writer._corked.append(b"frame")
            cork.add(writer)
        cork.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cork.run)
        start = trio.current_time()
        burst(wide)  # the first after a quiet spell: at once
        assert flushes == [start] * Cork.WIDE
        await trio.sleep(0.001)
        burst(wide)  # 1 ms after the last flush: held until 5 ms after it
        await trio.sleep(0.002)
        burst(wide)  # joined with the one held
        assert len(flushes) == Cork.WIDE
        await trio.sleep(0.01)
        assert flushes[Cork.WIDE :] == [start + 0.005] * Cork.WIDE
        assert all(not writer._corked for writer in wide)
        flushes.clear()
        burst(narrow)
        await trio.sleep(0.001)
        burst(narrow)  # too few sockets to be worth holding: at once, every time
        assert len(flushes) == 2 * len(narrow)
        nursery.cancel_scope.cancel()


async def test_a_cork_without_a_delay_never_holds(autojump_clock):
    flushes: list[float] = []
    writers = [_Held(flushes) for _ in range(2 * Cork.WIDE)]
    cork = Cork()
    for _ in range(3):
        for writer in writers:
            writer._corked.append(b"frame")
            cork.add(writer)
        cork.release()
        await trio.sleep(0.0001)
    assert len(flushes) == 3 * len(writers)


async def test_a_connection_works_on_after_forgetting_its_handshake(nursery):
    async def handler(request) -> None:
        ws = await request.accept()
        wire.forget_handshake(request)
        assert request._event is None
        assert ws._connection_proposal is None  # trio-websocket's own doing
        assert not isinstance(ws._wsproto.handshake, wsproto.handshake.H11Handshake)
        await ws.send_message(await ws.get_message())
        await ws.ping(b"ping")  # answered: trio-websocket's reader still gets events
        await ws.send_message("pong seen")
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
        closed.append(ws.closed.code)

    closed = []
    server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", 0, None))
    with trio.fail_after(10):
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as client:
            await client.send_message("echo")
            assert [await client.get_message() for _ in range(2)] == ["echo", "pong seen"]
        while not closed:
            await trio.sleep(0.01)
    assert closed == [1000]
