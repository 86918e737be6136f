"""Reconnect recovery under load and under faults (SPEC §11), on real servers.

tests/test_history.py covers the basic contract (ids are entry ids, a quiet since-join, the
recovery rule with a trimmed or expired stream, scrollback, history off). Here: no gap and no
duplicate while a sender streams and a receiver keeps reconnecting or re-joining (on both
backends); the pumps' Pub/Sub connections killed mid-stream (the hub's catch-up), and a
since-join racing the pump's resubscribe; Redis losing everything (restart, flush, and ids that
go backwards); trimming on real Redis; the admin API's publish and history; and the since edge
cases on both backends.

A failure prints the seed of the random timings: replay with TRIO_CHAT_RECOVERY_SEED=<seed>.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import pytest
import trio
from _chat import ADMIN, admin_client, make_config, make_token, start

from trio_chat._store.history import APPEND_SHA, parse_id
from trio_chat._store.redis import RedisBackend
from trio_chat.client import ConnectionRejected, ServerError, open_client

if TYPE_CHECKING:
    from _redis_server import RedisServer

    from trio_chat import Server
    from trio_chat.client import ChatClient

ROOM = "room"
#: no rate limit, no slow-consumer close and no session cap gets in the way of the streams
LIMITS = {
    "send_rate": 10_000.0,
    "send_burst": 10_000,
    "frame_rate": 10_000.0,
    "frame_burst": 10_000,
    "outbound_queue": 10_000,
    "max_sessions_per_user": 1000,
}
#: big enough that every since-join of the streams below is recovered
BIG_HISTORY = {"size": 10_000}
SEED = int(os.environ.get("TRIO_CHAT_RECOVERY_SEED", random.randrange(2**32)))

Frame = dict[str, Any]


@pytest.fixture
def rng() -> random.Random:
    print(f"\nrecovery seed {SEED} (replay: TRIO_CHAT_RECOVERY_SEED={SEED})")
    return random.Random(SEED)


# --- helpers -------------------------------------------------------------------------------------


async def redis_command(port: int, *args: object) -> Any:
    """One command to the test's own redis-server over a fresh RESP connection."""
    [reply] = await redis_commands(port, list(args))
    return reply


async def redis_commands(port: int, *commands: list[object]) -> list[Any]:
    """Commands run one after the other on one fresh connection; their replies."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = []
        for args in commands:
            request.append(b"*%d\r\n" % len(args))
            for arg in args:
                data = str(arg).encode()
                request.append(b"$%d\r\n%s\r\n" % (len(data), data))
        await stream.send_all(b"".join(request))
        resp = _Resp(stream)
        return [await resp.reply() for _ in commands]


class _Resp:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def _fill(self) -> None:
        chunk = await self._stream.receive_some(65536)
        if not chunk:
            raise EOFError("redis closed the connection")
        self._buffer += chunk

    async def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            await self._fill()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    async def reply(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:].decode()
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(f"redis error: {rest}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            if int(rest) < 0:
                return None
            while len(self._buffer) < int(rest) + 2:
                await self._fill()
            data, self._buffer = self._buffer[: int(rest)], self._buffer[int(rest) + 2 :]
            return data.decode()
        if kind == b"*":
            return None if int(rest) < 0 else [await self.reply() for _ in range(int(rest))]
        raise ValueError(f"unexpected reply {line!r}")


async def retry_unavailable(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Call until the server stops answering ``error unavailable`` (Redis coming back)."""
    while True:
        try:
            return await call(*args, **kwargs)
        except ServerError as exc:
            if exc.code != "unavailable":
                raise
        await trio.sleep(0.05)


async def request_collect(chat: ChatClient, frame: Frame, ref: str) -> tuple[list[Frame], Frame]:
    """Send ``frame`` and read up to its reply: (the frames before it, the reply)."""
    await chat.send_frame({**frame, "ref": ref})
    before = []
    while True:
        reply = await chat.receive()
        if reply.get("ref") == ref:
            if reply["type"] == "error":
                raise ServerError(reply)
            return before, reply
        before.append(reply)


async def join_since(chat: ChatClient, since: str, ref: str) -> tuple[list[Frame], Frame]:
    """``join {room, since}``: (the frames before the reply, the reply)."""
    return await request_collect(chat, {"type": "join", "room": ROOM, "since": since}, ref)


async def receive_messages(chat: ChatClient, count: int) -> list[Frame]:
    frames = [await chat.receive() for _ in range(count)]
    assert [f["type"] for f in frames] == ["message"] * count, frames
    return frames


async def assert_quiet(chat: ChatClient, ref: str = "quiet") -> None:
    """Nothing more is on its way: the next frame is the reply to a ping."""
    await chat.send_frame({"type": "ping", "ref": ref})
    frame = await chat.receive()
    assert (frame["type"], frame.get("ref")) == ("pong", ref), frame


async def stream_messages(
    chat: ChatClient, acks: list[Frame], rate: float, *, count: int, more: trio.Event | None = None
) -> None:
    """Send ``count`` messages (data 0, 1, ...) at ``rate`` per second, appending each ack; with
    ``more``, keep going until it is set, then ``count`` more."""
    start_time, n, extra = trio.current_time(), 0, None
    while extra is None or n < extra:
        await trio.sleep_until(start_time + n / rate)
        acks.append(await chat.send(ROOM, n))
        n += 1
        if extra is None and n >= count and (more is None or more.is_set()):
            extra = n if more is None else n + count


def check_segment(ids: list[str], since: str, acked: list[str]) -> None:
    """``ids``, received after a ``joined`` with ``since``, are the acked ids that follow
    ``since``, each once, in order, from the first on: no gap, no duplicate."""
    start_at = acked.index(since) + 1
    expected = acked[start_at : start_at + len(ids)]
    pairs = enumerate(zip(ids, expected, strict=False))  # expected may be shorter
    first_difference = next((n for n, (a, b) in pairs if a != b), min(len(ids), len(expected)))
    assert ids == expected, (
        f"after since={since} (#{start_at - 1}): {len(ids)} ids, the first {first_difference} "
        f"right; duplicates: {len(ids) - len(set(ids))}"
    )


def recovered_counts(caplog: pytest.LogCaptureFixture) -> list[int]:
    pattern = re.compile(r"Pub/Sub reconnected: (\d+) missed message")
    return [
        int(match[1])
        for record in caplog.records
        if (match := pattern.search(record.getMessage())) is not None
    ]


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records and tracebacks from trio_chat's loggers."""
    return [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.name.startswith("trio_chat")
        and (record.levelno >= logging.ERROR or record.exc_info)
    ]


async def two_or_one(nursery: trio.Nursery, url: str, **sections: Any) -> tuple[Server, Server]:
    """Two instances on Redis; on memory:// (one process each) the same instance twice."""
    one = await start(nursery, make_config(url, "inst-1", limits=LIMITS, **sections))
    if url.startswith("memory://"):
        return one, one
    two = await start(nursery, make_config(url, "inst-2", limits=LIMITS, **sections))
    return one, two


# --- 1. no gap, no duplicate, while a receiver keeps coming back ---------------------------------

STREAM_MESSAGES = 400
STREAM_RATE = 300.0
COMEBACKS = 16


@pytest.fixture
def store_url(backend_url: str) -> str:
    return backend_url


class Stream:
    """A sender's messages (data 0, 1, ...) after ``origin``, and their acks."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.acks: list[Frame] = []
        self.sent = trio.Event()

    async def run(self, chat: ChatClient, rate: float, count: int, more: trio.Event | None = None):
        await stream_messages(chat, self.acks, rate, count=count, more=more)
        self.sent.set()

    @property
    def acked(self) -> list[str]:
        """The ids in order, ``origin`` first."""
        return [self.origin] + [ack["id"] for ack in self.acks]

    def done(self, frames: list[Frame], since: str | None = None) -> bool:
        """Everything is sent, and ``frames`` end with the last one (or there are none, and
        they follow ``since``, which is the last one: a join from the end replays nothing)."""
        if not self.sent.is_set():
            return False
        last = frames[-1]["id"] if frames else since
        return last == self.acks[-1]["id"]


async def read_to_end(
    chat: ChatClient, frames: list[Frame], stream: Stream, since: str | None = None
) -> None:
    """Append what ``chat`` receives to ``frames`` until ``stream.done``. A receiver may get
    the last message before its sender gets the ack that marks the stream sent, so waiting
    for the next frame also ends when the stream is marked sent."""

    async def until_sent(scope: trio.CancelScope) -> None:
        await stream.sent.wait()
        scope.cancel()

    while not stream.done(frames, since):
        async with trio.open_nursery() as nursery:
            if not stream.sent.is_set():
                nursery.start_soon(until_sent, nursery.cancel_scope)
            frames.append(await chat.receive())
            nursery.cancel_scope.cancel()


class Comebacks:
    """A receiver that disconnects and comes back ``count`` times (on ``urls`` in turn), each
    time joining with ``since`` = the last id it saw, then reads to the end of the stream."""

    def __init__(self, user: str, urls: list[str], rng: random.Random, count: int) -> None:
        self.user, self.urls, self.rng, self.count = user, urls, rng, count
        self.seen: list[Frame] = []
        self.joins: list[Frame] = []
        self.while_streaming = 0

    async def run(self, stream: Stream) -> None:
        for n in range(self.count + 1):
            last = n == self.count
            self.while_streaming += not stream.sent.is_set()
            async with open_client(self.urls[n % len(self.urls)], make_token(self.user)) as chat:
                since = self.seen[-1]["id"] if self.seen else stream.origin
                before, joined = await join_since(chat, since, f"join-{n}")
                assert before == []  # nothing of the room before the reply
                self.joins.append(joined)
                with trio.move_on_after(math.inf if last else self.rng.uniform(0.02, 0.12)):
                    await read_to_end(chat, self.seen, stream)
                if last:
                    await assert_quiet(chat)  # no duplicate after the last one either
            if not last:
                await trio.sleep(self.rng.uniform(0, 0.04))  # away: misses some

    def check(self, stream: Stream) -> str:
        assert [f["type"] for f in self.seen] == ["message"] * len(self.seen)
        assert [f["id"] for f in self.seen] == stream.acked[1:]
        assert [f["data"] for f in self.seen] == list(range(len(stream.acks)))
        assert [(j["recovered"], j["room"]) for j in self.joins] == [(True, ROOM)] * len(self.joins)
        replayed = sum(j["missed"] for j in self.joins)
        assert replayed > 0  # the replays were exercised
        assert self.while_streaming >= self.count // 2  # and while the stream ran
        return (
            f"{self.user}: {len(self.joins)} connections ({self.while_streaming} while "
            f"streaming), {replayed} replayed"
        )


class Rejoins:
    """One connection that re-joins the room it is in with ``since`` ``count`` times (every
    4th time after a ``leave``), ``since`` being one of the last 20 ids it saw, then reads to
    the end of the stream.

    From each ``joined`` on, the frames must be the acked ones after its ``since``, each once,
    in order. Live frames already on their way before a ``joined`` (all those after ``since``)
    are, by SPEC §11, sent again by the replay; they are counted.
    """

    def __init__(self, rng: random.Random, count: int) -> None:
        self.rng, self.count = rng, count
        # (since, the message frames from that join's reply to the next reply)
        self.segments: list[tuple[str, list[Frame]]] = []
        self.joins: list[Frame] = []
        self.leaves = 0
        self.in_flight = 0  # frames that arrived between a join and its reply

    async def run(self, chat: ChatClient, stream: Stream) -> None:
        since = stream.origin
        for n in range(self.count + 1):
            last = n == self.count
            if n % 4 == 3:
                before, _ = await request_collect(
                    chat, {"type": "leave", "room": ROOM}, f"leave-{n}"
                )
                self.segments[-1][1].extend(before)
                self.leaves += 1
            before, joined = await join_since(chat, since, f"join-{n}")
            if n % 4 == 3 or not self.segments:
                assert before == []  # not in the room until the reply
            else:
                self.segments[-1][1].extend(before)  # in flight: the previous join's
                self.in_flight += len(before)
            self.joins.append(joined)
            self.segments.append((since, []))
            frames = self.segments[-1][1]
            with trio.move_on_after(math.inf if last else self.rng.uniform(0.02, 0.12)):
                await read_to_end(chat, frames, stream, since)
            candidates = [since] + [f["id"] for f in frames]
            since = self.rng.choice(candidates[-20:])
        await assert_quiet(chat)

    def check(self, stream: Stream) -> str:
        acked = stream.acked
        for since, frames in self.segments:
            assert [f["type"] for f in frames] == ["message"] * len(frames)
            check_segment([f["id"] for f in frames], since, acked)
        since, frames = self.segments[-1]
        assert (frames[-1]["id"] if frames else since) == acked[-1]  # read to the end
        assert [(j["recovered"], j["room"]) for j in self.joins] == [(True, ROOM)] * len(self.joins)
        replayed = sum(j["missed"] for j in self.joins)
        assert replayed > 0
        return (
            f"{len(self.joins)} joins on one connection ({self.leaves} after a leave), "
            f"{replayed} replayed; {self.in_flight} live ones arrived between a join and its reply"
        )


async def test_a_receiver_that_keeps_reconnecting_with_since_misses_and_repeats_nothing(
    store_url, nursery, rng
):
    """A sender on instance 1 streams a few hundred messages; a receiver reconnects again and
    again, alternating instance 2 and 1, each time joining with ``since`` = the last id it saw.
    What it received, replayed and live, is the acked sequence exactly."""
    one, two = await two_or_one(nursery, store_url, history=BIG_HISTORY)
    receiver = Comebacks("bob", [two.url, one.url], rng, COMEBACKS)
    with trio.fail_after(30):
        async with open_client(one.url, make_token("alice")) as alice:
            await alice.join(ROOM)
            stream = Stream((await alice.send(ROOM, "origin"))["id"])
            async with trio.open_nursery() as streaming:
                streaming.start_soon(stream.run, alice, STREAM_RATE, STREAM_MESSAGES)
                streaming.start_soon(receiver.run, stream)
    print(f"{len(stream.acks)} messages; {receiver.check(stream)}")


async def test_rejoining_with_since_on_the_same_connection_replays_without_gap_or_duplicate(
    store_url, nursery, rng
):
    """The same on one open connection (instance 2) that re-joins the room it is in with an
    earlier ``since``, or leaves and joins again with one."""
    one, two = await two_or_one(nursery, store_url, history=BIG_HISTORY)
    receiver = Rejoins(rng, COMEBACKS)
    with trio.fail_after(30):
        async with (
            open_client(one.url, make_token("alice")) as alice,
            open_client(two.url, make_token("bob")) as bob,
        ):
            await alice.join(ROOM)
            stream = Stream((await alice.send(ROOM, "origin"))["id"])
            async with trio.open_nursery() as streaming:
                streaming.start_soon(stream.run, alice, STREAM_RATE, STREAM_MESSAGES)
                streaming.start_soon(receiver.run, bob, stream)
    print(f"{len(stream.acks)} messages; {receiver.check(stream)}")


# --- 2. the pumps' Pub/Sub connections killed mid-stream --------------------------------------

KILLS = 3


async def test_members_get_every_message_once_when_the_pubsub_connections_are_killed(
    redis_server: RedisServer, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, rng
):
    """Members stay connected (three on instance 2, one on instance 1) while a sender on
    instance 1 streams; ``CLIENT KILL TYPE pubsub`` three times. Each member gets every acked
    message, in order, exactly once: the hub's catch-up hands out what the pump missed. On
    instance 2 meanwhile, one receiver keeps reconnecting with ``since`` and one keeps
    re-joining with it: their replays meet the catch-up."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    one = await start(
        nursery, make_config(redis_server.url, "inst-1", limits=LIMITS, history=BIG_HISTORY)
    )
    two = await start(
        nursery, make_config(redis_server.url, "inst-2", limits=LIMITS, history=BIG_HISTORY)
    )
    members = {"bob": two, "carol": two, "dave": two, "erin": one}
    got: dict[str, list[Frame]] = {name: [] for name in members}
    comebacks = Comebacks("frank", [two.url], rng, COMEBACKS)
    rejoins = Rejoins(rng, COMEBACKS)
    killed: list[int] = []
    resumed_after: list[float] = []
    kills_done = trio.Event()
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            alice = await stack.enter_async_context(open_client(one.url, make_token("alice")))
            await alice.join(ROOM)
            chats = {}
            for name, server in members.items():
                chats[name] = await stack.enter_async_context(
                    open_client(server.url, make_token(name))
                )
                await chats[name].join(ROOM)
            grace = await stack.enter_async_context(open_client(two.url, make_token("grace")))
            stream = Stream((await alice.send(ROOM, "origin"))["id"])
            for chat in chats.values():
                assert (await chat.receive())["id"] == stream.origin

            async def member(name: str) -> None:
                await read_to_end(chats[name], got[name], stream)
                await assert_quiet(chats[name])

            async def killer() -> None:
                for _ in range(KILLS):
                    await trio.sleep(0.25)
                    started = trio.current_time()
                    kill, last = await redis_commands(
                        redis_server.port,
                        ["CLIENT", "KILL", "TYPE", "pubsub"],
                        ["XREVRANGE", f"chat:room:{ROOM}", "+", "-", "COUNT", 1],
                    )
                    killed.append(kill)
                    mark = parse_id(last[0][0])  # published after it: after the kill
                    # the pumps are back when every member gets a message published later
                    while not all(
                        frames and parse_id(frames[-1]["id"]) > mark for frames in got.values()
                    ):
                        await trio.sleep(0.005)
                    resumed_after.append(trio.current_time() - started)
                kills_done.set()

            async with trio.open_nursery() as streaming:
                streaming.start_soon(stream.run, alice, 250.0, 60, kills_done)
                streaming.start_soon(killer)
                for name in members:
                    streaming.start_soon(member, name)
                streaming.start_soon(comebacks.run, stream)
                streaming.start_soon(rejoins.run, grace, stream)
    caught_up = recovered_counts(caplog)
    print(
        f"{len(stream.acks)} messages; pubsub connections killed {killed}; messages resumed "
        f"after {[round(t, 3) for t in resumed_after]} s; catch-ups handed out {caught_up}"
    )
    acked = stream.acked[1:]
    for name, frames in got.items():
        assert [f["type"] for f in frames] == ["message"] * len(frames), name
        ids = [f["id"] for f in frames]
        assert len(set(ids)) == len(ids), f"{name}: duplicates"
        assert ids == acked, f"{name}: missing {sorted(set(acked) - set(ids))[:10]}"
    print(comebacks.check(stream))
    print(rejoins.check(stream))
    assert killed == [2] * KILLS  # one Pub/Sub connection per instance each time
    assert sum(caught_up) > 0  # the catch-up was exercised
    assert server_errors(caplog) == []


async def test_a_since_join_that_straddles_the_pumps_resubscribe_still_gets_caught_up(
    redis_server: RedisServer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
):
    """A since-join of a room new to instance 2 whose first read (the room's last entry, the
    catch-up floor) is answered only after the pump has reconnected and resubscribed: the
    resubscribe already took the held room's channel. The room must still be caught up after
    the next Pub/Sub loss.

    The read is held by a gate on the backend (a slow reply, deterministic here; under load it
    is a pipeline waiting its turn while the pump's SUBSCRIBE is out)."""
    armed, held, gate = trio.Event(), trio.Event(), trio.Event()
    floor = ("xrevrange", (f"chat:room:{ROOM}", "+", "-", 1))
    execute = RedisBackend.execute

    async def slow_floor(self: RedisBackend, batch: Any) -> None:
        commands = [(c.name, c.args) for c in batch.commands]
        if armed.is_set() and not gate.is_set() and commands == [floor]:
            held.set()
            await gate.wait()
        await execute(self, batch)

    monkeypatch.setattr(RedisBackend, "execute", slow_floor)
    one = await start(nursery, make_config(redis_server.url, "inst-1"))
    two = await start(nursery, make_config(redis_server.url, "inst-2", admin=ADMIN))

    async def pump_back(losses: int) -> None:
        """Instance 2's pump noticed ``losses`` losses in all, and is subscribed again."""
        while True:
            metrics = (await http.get("/metrics")).text
            counted = re.search(r"^trio_chat_redis_reconnects_total (\S+)$", metrics, re.M)
            if counted is not None and float(counted[1]) >= losses:
                if (await http.get("/readyz")).status_code == 200:
                    return
            await trio.sleep(0.01)

    with trio.fail_after(10):
        async with (
            open_client(one.url, make_token("alice")) as alice,
            open_client(two.url, make_token("frank")) as frank,
            admin_client(two) as http,
        ):
            await alice.join(ROOM)
            since = (await alice.send(ROOM, "origin"))["id"]
            armed.set()  # instance 1 has subscribed: the next floor read is frank's
            await redis_command(redis_server.port, "CLIENT", "KILL", "TYPE", "pubsub")
            await frank.send_frame({"type": "join", "room": ROOM, "since": since, "ref": "j"})
            await held.wait()
            await pump_back(1)  # reconnected and resubscribed, the held room included
            gate.set()
            joined = await frank.receive()
            live = await alice.send(ROOM, 1)
            assert (await frank.receive())["id"] == live["id"]
            # the next loss: what is published meanwhile comes through the catch-up
            await redis_command(redis_server.port, "CLIENT", "KILL", "TYPE", "pubsub")
            during = await alice.send(ROOM, 2)
            await pump_back(2)
            after = await alice.send(ROOM, 3)
            got = []
            with trio.move_on_after(2):
                while len(got) < 2:
                    got.append((await frank.receive())["data"])
    assert (joined["type"], joined["recovered"], joined["missed"]) == ("joined", True, 0)
    assert parse_id(during["id"]) < parse_id(after["id"])
    assert got == [2, 3], "the message published while the pump was away never came"


# --- 3. Redis lost everything --------------------------------------------------------------------


async def _connect(url: str, user: str, stack: AsyncExitStack) -> ChatClient:
    """Connect, retrying while the handshake is refused 503 (Redis coming back)."""
    while True:
        try:
            return await stack.enter_async_context(open_client(url, make_token(user)))
        except ConnectionRejected as exc:
            if exc.status_code != 503:
                raise
        await trio.sleep(0.05)


@pytest.mark.parametrize("fault", ["restart", "flush"])
async def test_after_redis_lost_everything_recovery_says_so_then_works_again(
    redis_server: RedisServer,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    fault: str,
):
    """Redis restarted empty (or FLUSHALL + SCRIPT FLUSH): an old ``since`` is not recovered;
    sending works again (the script is loaded again on NOSCRIPT); a new ``since`` is."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    one = await start(nursery, make_config(redis_server.url, "inst-1"))
    two = await start(nursery, make_config(redis_server.url, "inst-2"))
    with trio.fail_after(20):
        async with (
            open_client(one.url, make_token("alice")) as alice,
            open_client(two.url, make_token("carol")) as carol,  # stays connected throughout
        ):
            await alice.join(ROOM)
            await carol.join(ROOM)
            async with open_client(two.url, make_token("bob")) as bob:
                await bob.join(ROOM)
                before = [await alice.send(ROOM, n) for n in range(3)]
                old_since = (await receive_messages(bob, 3))[-1]["id"]
                await receive_messages(carol, 3)
            if fault == "restart":
                redis_server.restart()
            else:
                assert await redis_command(redis_server.port, "FLUSHALL") == "OK"
                assert await redis_command(redis_server.port, "SCRIPT", "FLUSH") == "OK"
            async with AsyncExitStack() as stack:
                bob = await _connect(two.url, "bob", stack)
                _, lost = await retry_unavailable(join_since, bob, old_since, "lost")
                await assert_quiet(bob)
                after = await retry_unavailable(alice.send, ROOM, "after")
                assert (await bob.receive())["id"] == after["id"]
                # carol stayed: once instance 2's pump is back she gets it too
                assert (await carol.receive())["id"] == after["id"]
            later = [await alice.send(ROOM, n) for n in range(2)]
            async with open_client(two.url, make_token("bob")) as bob:
                _, back = await join_since(bob, after["id"], "back")
                replayed = await receive_messages(bob, back["missed"])
                await assert_quiet(bob)
            scripts = await redis_command(redis_server.port, "SCRIPT", "EXISTS", APPEND_SHA)
    assert before[-1]["id"] == old_since
    assert (lost["recovered"], lost["missed"]) == (False, 0)
    assert (back["recovered"], back["missed"]) == (True, 2)
    assert [m["id"] for m in replayed] == [a["id"] for a in later]
    assert scripts == [1]
    assert server_errors(caplog) == []


async def test_members_still_get_messages_when_redis_comes_back_empty_with_lower_ids(
    redis_server: RedisServer, nursery: trio.Nursery
):
    """Redis restarted empty on a host whose clock is behind the previous one's: the new
    entry ids are lower than those the instance handed out before. Members that stayed
    connected must still get the acknowledged messages (SPEC §11: only Redis losing an entry
    loses it). The clock skew is simulated by a first entry an hour in the future."""
    port = redis_server.port
    future = (int((await redis_command(port, "TIME"))[0]) + 3600) * 1000
    entry = '{"data":"from the fast clock","ts":0,"from":null}'
    await redis_command(port, "XADD", f"chat:room:{ROOM}", f"{future}-0", "m", entry)
    server = await start(nursery, make_config(redis_server.url, "inst-1"))
    with trio.fail_after(10):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("carol")) as carol,
        ):
            await alice.join(ROOM)
            await carol.join(ROOM)
            before = await alice.send(ROOM, "before")
            assert (await carol.receive())["id"] == before["id"]
            assert await redis_command(port, "FLUSHALL") == "OK"  # lost everything
            after = await retry_unavailable(alice.send, ROOM, "after")
            assert parse_id(after["id"]) < parse_id(before["id"])  # the clock is behind
            got = None
            with trio.move_on_after(2):
                got = await carol.receive()
    assert got is not None, "an acknowledged message never reached a member"
    assert (got["id"], got["data"]) == (after["id"], "after")


# --- 4. trimming on real Redis ---------------------------------------------------------------


async def test_a_since_trimmed_away_on_redis_is_not_recovered_and_gets_the_latest(
    redis_server: RedisServer, nursery: trio.Nursery
):
    """history.size 5, and stream nodes of 2 entries so that ``MAXLEN ~`` trims often."""
    port = redis_server.port
    assert await redis_command(port, "CONFIG", "SET", "stream-node-max-entries", "2") == "OK"
    server = await start(nursery, make_config(redis_server.url, history={"size": 5}))
    stream = f"chat:room:{ROOM}"
    with trio.fail_after(10):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            await alice.join(ROOM)
            acks = [await alice.send(ROOM, n) for n in range(20)]
            ids = [a["id"] for a in acks]
            kept = [entry[0] for entry in await redis_command(port, "XRANGE", stream, "-", "+")]
            assert 5 <= len(kept) < 20  # trimmed
            assert kept == ids[-len(kept) :]  # the latest ones, oldest first
            print(f"history.size 5, nodes of 2: the stream kept {len(kept)} of 20")

            # since long gone: not recovered; the latest five come
            _, gone = await join_since(bob, ids[0], "gone")
            gone_frames = await receive_messages(bob, gone["missed"])
            await assert_quiet(bob)
            # since = the first entry kept: recovered exactly when no more than 5 follow
            _, first = await join_since(bob, kept[0], "first")
            first_frames = await receive_messages(bob, first["missed"])
            await assert_quiet(bob)
            # trimmed exactly to 3: since is gone though only 4 follow it (<= size): the first
            # entry says so
            assert await redis_command(port, "XTRIM", stream, "MAXLEN", "=", 3) >= 1
            _, trimmed = await join_since(bob, ids[-5], "trimmed")
            trimmed_frames = await receive_messages(bob, trimmed["missed"])
            await assert_quiet(bob)
            # the stream deleted: nothing vouches for anything
            assert await redis_command(port, "DEL", stream) == 1
            _, deleted = await join_since(bob, ids[-1], "deleted")
            await assert_quiet(bob)
    assert (gone["recovered"], gone["missed"]) == (False, 5)
    assert [f["id"] for f in gone_frames] == ids[-5:]
    follow = len(kept) - 1
    assert (first["recovered"], first["missed"]) == (follow <= 5, min(follow, 5))
    assert [f["id"] for f in first_frames] == ids[-min(follow, 5) :]
    assert (trimmed["recovered"], trimmed["missed"]) == (False, 3)
    assert [f["id"] for f in trimmed_frames] == ids[-3:]
    assert (deleted["recovered"], deleted["missed"]) == (False, 0)


# --- 5. the admin API ------------------------------------------------------------------------


async def test_admin_messages_land_in_history_and_the_admin_history_pages_like_the_frame(
    store_url, nursery
):
    server = await start(nursery, make_config(store_url, admin=ADMIN))
    with trio.fail_after(10):
        async with (
            admin_client(server) as http,
            open_client(server.url, make_token("bob")) as bob,
        ):
            await bob.join(ROOM)
            published = []
            for n in range(7):
                r = await http.post("/v1/publish", json={"room": ROOM, "data": n})
                assert r.status_code == 200, r.text
                published.append(r.json())
            live = await receive_messages(bob, 7)
            # pages of 3, from the latest back, over HTTP and over the WebSocket
            http_pages, ws_pages, before = [], [], None
            while True:
                params = {"limit": "3"} | ({"before": before} if before else {})
                r = await http.get(f"/v1/rooms/{ROOM}/history", params=params)
                assert r.status_code == 200, r.text
                http_pages.append(r.json())
                frame = await bob.request("history", room=ROOM, limit=3, before=before)
                ws_pages.append(frame)
                if not r.json()["more"]:
                    break
                before = r.json()["messages"][0]["id"]
            default = (await http.get(f"/v1/rooms/{ROOM}/history")).json()
            empty = (await http.get("/v1/rooms/never-written/history")).json()
            # a since-join replays them as they came live, from null
            _, joined = await join_since(bob, published[1]["id"], "since")
            replayed = await receive_messages(bob, joined["missed"])
            await assert_quiet(bob)
    assert [m["id"] for m in live] == [p["id"] for p in published]
    assert {m["from"] for m in live} == {None}
    assert [[m["data"] for m in page["messages"]] for page in http_pages] == [
        [4, 5, 6],
        [1, 2, 3],
        [0],
    ]
    assert [page["more"] for page in http_pages] == [True, True, False]
    for http_page, ws_page in zip(http_pages, ws_pages, strict=True):
        assert http_page["messages"] == ws_page["messages"]
        assert (http_page["more"], http_page["room"]) == (ws_page["more"], ROOM)
    assert http_pages[0]["messages"][-1] == {
        "id": published[6]["id"],
        "room": ROOM,
        "from": None,
        "data": 6,
        "ts": published[6]["ts"],
    }
    assert [m["id"] for m in default["messages"]] == [p["id"] for p in published]
    assert default["more"] is False
    assert empty == {"room": "never-written", "messages": [], "more": False}
    assert (joined["recovered"], joined["missed"]) == (True, 5)
    assert replayed == live[2:]


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=x",
        "limit=-1",
        "limit=",
        "limit=1.5",
        "limit=%C2%B2",  # "²": str.isdigit() says yes, int() says no
        "limit=" + "9" * 5000,  # past int()'s digit limit
        "before=x",
        "before=1-2-3",
        "before=",
        "before=99999999999999999999999-0",
    ],
)
async def test_a_bad_admin_history_query_is_400_with_a_json_error(nursery, query):
    server = await start(nursery, make_config(admin=ADMIN))
    async with admin_client(server) as http:
        r = await http.get(f"/v1/rooms/{ROOM}/history?{query}")
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == "bad_request"
    assert isinstance(body["message"], str)
    assert body["message"]


# --- 6. since edge cases, on both backends ----------------------------------------------------


async def test_since_edge_cases_on_both_backends(store_url, nursery):
    server = await start(nursery, make_config(store_url, limits=LIMITS))
    with trio.fail_after(10):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            # a room never written: no stream vouches for anything
            _, nothing = await join_since(bob, "1-0", "nothing")
            await assert_quiet(bob)
            await alice.join(ROOM)
            acks = []
            for n in range(4):
                acks.append(await alice.send(ROOM, n))
                await trio.sleep(0.003)  # each in a millisecond of its own
            await receive_messages(bob, 4)
            # a since that is no entry id, between the 2nd and the 3rd: what follows it
            ms, seq = parse_id(acks[1]["id"])
            assert parse_id(acks[2]["id"]) > (ms, seq + 1)
            _, middle = await join_since(bob, f"{ms}-{seq + 1}", "between")
            middle_frames = await receive_messages(bob, middle["missed"])
            await assert_quiet(bob)
            # a since past the last entry: nothing missed that the stream knows of
            last_ms, _ = parse_id(acks[-1]["id"])
            _, future = await join_since(bob, f"{last_ms + 60_000}-0", "future")
            await assert_quiet(bob)
            # the sender's own messages are in its replay too: every message of the room
            _, own = await join_since(alice, acks[0]["id"], "own")
            own_frames = await receive_messages(alice, own["missed"])
            await assert_quiet(alice)
            # a re-join with since after leaving the room joins it again
            await bob.leave(ROOM)
            _, rejoined = await join_since(bob, acks[2]["id"], "rejoined")
            rejoined_frames = await receive_messages(bob, rejoined["missed"])
            live = await alice.send(ROOM, "live")
            assert (await bob.receive())["id"] == live["id"]
            await assert_quiet(bob)
    # On one Redis a room's history is one line: a since between two entries, or past the
    # last, is vouched for. On a cluster a failover can fork it, and only a since that is an
    # entry of the stream proves the client's history is the stream's (SPEC §12).
    linear = not store_url.startswith("redis+cluster://")
    assert (nothing["recovered"], nothing["missed"]) == (False, 0)
    assert (middle["recovered"], middle["missed"]) == (linear, 2)
    assert [f["id"] for f in middle_frames] == [a["id"] for a in acks[2:]]
    assert (future["recovered"], future["missed"]) == (linear, 0)
    assert (own["recovered"], own["missed"]) == (True, 3)
    assert [(f["id"], f["from"]) for f in own_frames] == [(a["id"], "alice") for a in acks[1:]]
    assert (rejoined["recovered"], rejoined["missed"]) == (True, 1)
    assert [f["id"] for f in rejoined_frames] == [acks[3]["id"]]


async def test_a_send_redis_ran_after_stalling_is_acked_not_refused(redis_server, nursery):
    # found by the soak: Redis paused past the command timeout still runs the script it had
    # read; the sender must not be told 'unavailable' for a message everyone then receives
    config = make_config(redis_server.url, redis={"command_timeout": 0.3})
    server = await start(nursery, config)
    with trio.fail_after(10):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            await alice.join("room")
            await bob.join("room")
            await alice.send("room", "warm")  # the script is loaded
            assert (await bob.receive())["data"] == "warm"
            redis_server.pause()
            await alice.send_frame({"type": "send", "room": "room", "data": "stalled", "ref": 7})
            await trio.sleep(0.5)  # past the command timeout: the batch got no answer
            redis_server.resume()
            answer = await alice.receive()
            got = await bob.receive()
            assert (await bob.ping())["type"] == "pong"  # and nothing more
    assert (answer["type"], answer["ref"]) == ("ack", 7)
    assert (got["data"], got["id"]) == ("stalled", answer["id"])


async def test_a_send_redis_never_ran_is_unavailable_and_never_delivered(redis_server, nursery):
    config = make_config(redis_server.url, redis={"command_timeout": 0.3})
    server = await start(nursery, config)
    with trio.fail_after(10):
        async with open_client(server.url, make_token("alice")) as alice:
            await alice.join("room")
            await alice.send("room", "warm")
            redis_server.pause()
            await alice.send_frame({"type": "send", "room": "room", "data": "lost", "ref": 7})
            await trio.sleep(0.5)
            redis_server.kill()  # what it had read dies with it
            answer = await alice.receive()
    assert (answer["type"], answer["code"], answer["ref"]) == ("error", "unavailable", 7)


async def test_the_catch_up_hands_out_what_a_late_higher_id_would_hide(redis_server, nursery):
    """What a Redis Cluster failover can do (bench/soak.py --cluster found it): a master
    deposed while stalled publishes a late write whose id is higher than a message its promoted
    replica stored meanwhile, unseen by the pump (still subscribed on the old master). Here on
    one Redis: a live message whose id the stream never gets, then a stored message with a
    lower id that is never published, then the pump's connection killed. The catch-up must
    hand out the stored one, though the pump has handed out a higher id."""
    server = await start(nursery, make_config(redis_server.url, limits=LIMITS))
    port = redis_server.port
    with trio.fail_after(10):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            await alice.join(ROOM)
            await bob.join(ROOM)
            first = await alice.send(ROOM, "first")
            assert (await bob.receive())["id"] == first["id"]
            ms, _ = parse_id(first["id"])
            stored_id, late_id = f"{ms + 1000}-0", f"{ms + 2000}-0"
            body = {"room": ROOM, "from": "carol", "session": None, "ts": ms + 1000}
            late = json.dumps({"id": late_id, **body, "data": "late"})
            assert await redis_command(port, "PUBLISH", f"chat:room:{ROOM}", late) == 1
            assert (await bob.receive())["id"] == late_id
            entry = json.dumps({**body, "data": "stored"})
            await redis_command(port, "XADD", f"chat:room:{ROOM}", stored_id, "m", entry)
            await redis_command(port, "CLIENT", "KILL", "TYPE", "pubsub")
            caught_up = await bob.receive()
            assert (caught_up["id"], caught_up["data"]) == (stored_id, "stored")
            after = await alice.send(ROOM, "after")
            assert (await bob.receive())["id"] == after["id"]
            await assert_quiet(bob)
