"""Hostile input and faults that must cost one request or one connection, never the server."""

from __future__ import annotations

import base64
import json

import pytest
import trio
from _chat import SECRET, closed_with, make_config, make_token, open_backend, snapshot, start
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from trio_chat import _wire as wire
from trio_chat._connection import ConnectionHandler
from trio_chat._errors import BackendUnavailable
from trio_chat._store.interface import Batch
from trio_chat._store.redis import RedisBackend
from trio_chat._wire import FrameWriter
from trio_chat.client import open_client

leaks_client_socket = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)


async def _raw_request(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        response = b""
        with trio.move_on_after(2):
            while chunk := await stream.receive_some():
                response += chunk
    return response


async def _still_serves(url: str) -> None:
    async with open_client(url, make_token("survivor")) as chat:
        assert (await chat.ping())["type"] == "pong"


async def test_malformed_request_target_is_400_and_the_server_lives(nursery):
    server = await start(nursery, make_config())
    response = await _raw_request(
        server.port,
        b"GET //[x/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert response.startswith(b"HTTP/1.1 400")
    await _still_serves(server.url)


def _jwt_with_header(header: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part({'sub': 'a', 'iat': 1, 'exp': 2**31})}.c2ln"


@leaks_client_socket
@pytest.mark.parametrize("alg", [["HS256"], {"x": 1}, None, 5])
async def test_odd_jwt_headers_are_401_and_the_server_lives(nursery, alg):
    server = await start(nursery, make_config())
    with pytest.raises(ConnectionRejected) as info:
        async with open_client(server.url, _jwt_with_header({"alg": alg, "typ": "JWT"})):
            pass
    assert info.value.status_code == 401
    await _still_serves(server.url)


@leaks_client_socket
async def test_a_wrongly_typed_auth_key_is_500_and_the_server_lives(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url))
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        batch = Batch()
        batch.set("auth:alice", "not a hash")
        await backend.execute(batch)
    with pytest.raises(ConnectionRejected) as info:
        async with open_client(server.url, make_token("alice")):
            pass
    assert info.value.status_code == 500
    await _still_serves(server.url)


async def test_the_token_cookie_is_found_after_odd_cookies(nursery):
    server = await start(nursery, make_config())
    cookie = f'prefs={{"a": 1}}; theme=dark mode; trio_chat_token={make_token("alice")}'
    async with open_client(server.url, headers=[("Cookie", cookie)]) as chat:
        assert chat.welcome["user_id"] == "alice"


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"send","room":"r","data":NaN}',
        '{"type":"send","room":"r","data":[Infinity]}',
        '{"type":"send","room":"r","data":1e400}',
        '{"type":"ping","ref":"\\ud800"}',
        "[" * 50_000,
    ],
    ids=["nan", "infinity", "overflow", "lone-surrogate", "deep-nesting"],
)
async def test_frames_no_client_could_parse_back_are_refused(nursery, raw):
    server = await start(nursery, make_config())
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("r")
        await chat.ws.send_message(raw)
        reply = await chat.receive()
        assert (reply["type"], reply["code"]) == ("error", "bad_request")
        assert (await chat.ping())["type"] == "pong"


async def test_repeated_malformed_frames_close_1008(nursery):
    server = await start(nursery, make_config())
    async with open_client(server.url, make_token("alice")) as chat:
        for _ in range(10):
            await chat.ws.send_message("not json")
        codes = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                codes.append((await chat.receive())["code"])
        assert codes == ["bad_request"] * 10
        assert closed.value.reason.code == 1008


async def test_tokens_never_reach_the_logs(nursery, monkeypatch, caplog):
    async def broken(self, session, message):
        raise RuntimeError("bug")

    monkeypatch.setattr(ConnectionHandler, "_refresh", broken)
    server = await start(nursery, make_config())
    secret_token = make_token("alice", ttl=7200)
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.send_frame({"type": "refresh", "token": secret_token, "ref": 1})
        assert (await chat.receive())["code"] == "internal"
    assert "error handling a Refresh frame" in caplog.text
    assert secret_token not in caplog.text
    assert SECRET not in caplog.text


async def test_churn_leaves_no_session_record_behind(redis_server, nursery):
    # a heartbeat every 0.1 s, racing with sessions that come and go
    config = make_config(redis_server.url, "inst-1", session={"ttl": 30, "instance_ttl": 0.3})
    server = await start(nursery, config)
    token = make_token("alice")
    with trio.fail_after(30):
        for n in range(60):
            async with open_client(server.url, token) as chat:
                await chat.join(f"room-{n % 3}")
        await trio.sleep(0.3)  # a few more heartbeats after the last one left
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        batch = Batch()
        user = batch.smembers("ws:user:alice")
        owned = batch.hgetall("ws:instance:inst-1:sessions")
        rooms = [batch.zcard(f"ws:room:room-{n}") for n in range(3)]
        await backend.execute(batch)
    assert (user.value, owned.value, [r.value for r in rooms]) == (set(), {}, [0, 0, 0])


async def test_a_cleanup_that_failed_is_retried(redis_server, nursery, monkeypatch):
    # Redis drops the first cleanup (as if it went down just then), and answers again after.
    real_execute = RedisBackend.execute
    dropped = []

    async def flaky_execute(self, batch):
        is_cleanup = any(
            c.name == "delete" and c.args[0].startswith("ws:session:") for c in batch.commands
        )
        if is_cleanup and not dropped:
            dropped.append(batch)
            raise BackendUnavailable("Redis went away")
        await real_execute(self, batch)

    monkeypatch.setattr(RedisBackend, "execute", flaky_execute)
    config = make_config(redis_server.url, "inst-1", session={"ttl": 30, "instance_ttl": 0.6})
    server = await start(nursery, config)
    async with open_client(server.url, make_token("alice")) as chat:
        sid = chat.welcome["session_id"]
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        with trio.fail_after(5):
            while not dropped:
                await trio.sleep(0.01)
            while (await snapshot(backend, f"ws:session:{sid}"))[f"ws:session:{sid}"]:
                await trio.sleep(0.05)
        batch = Batch()
        user = batch.smembers("ws:user:alice")
        await backend.execute(batch)
    assert user.value == set()


async def test_delivering_to_a_session_that_just_ended_is_dropped(nursery, monkeypatch):
    # Hold the cleanup back, so that the session is still in the hub after its connection's
    # nursery has closed: the pump's deliveries must be dropped, not spawn a writer.
    real_unregister = ConnectionHandler._unregister

    async def slow_unregister(self, *args):
        await trio.sleep(0.3)
        await real_unregister(self, *args)

    monkeypatch.setattr(ConnectionHandler, "_unregister", slow_unregister)
    server = await start(nursery, make_config())
    async with open_client(server.url, make_token("bob")) as bob:
        await bob.join("room")
        async with open_client(server.url, make_token("alice")) as alice:
            await alice.join("room")
        for n in range(20):
            await bob.send("room", n)
        await trio.sleep(0.4)
        assert (await bob.ping())["type"] == "pong"
    await _still_serves(server.url)


async def test_a_broken_socket_under_backlog_costs_only_its_session(nursery, monkeypatch):
    # Every frame goes through the queue (as under load); bob's socket breaks under its
    # backlog: his session ends, the pump keeps delivering to the others.
    def would_block(fd, data):
        raise BlockingIOError

    writers = []
    real_init, real_take = FrameWriter.__init__, FrameWriter._take_batch

    def init(self, ws, limit):
        writers.append(self)
        real_init(self, ws, limit)

    def take_batch(self):
        if self is writers[0] and armed:
            raise trio.BrokenResourceError("connection reset")
        return real_take(self)

    armed = False
    monkeypatch.setattr(wire.os, "write", would_block)
    monkeypatch.setattr(FrameWriter, "__init__", init)
    monkeypatch.setattr(FrameWriter, "_take_batch", take_batch)
    server = await start(nursery, make_config())
    async with open_client(server.url, make_token("bob")) as bob:
        await bob.join("room")
        async with open_client(server.url, make_token("carol")) as carol:
            await carol.join("room")
            armed = True
            for n in range(20):
                await carol.send("room", n)
            assert (await carol.ping())["type"] == "pong"
    await _still_serves(server.url)


async def test_deliveries_to_a_closing_session_are_dropped(nursery, monkeypatch):
    # The session's reader has ended (malformed frames: 1008) while its close is still being
    # written, slowly, and every frame goes through a drain task: the pump's deliveries to it
    # in that window must be dropped, and cost nobody else anything.
    def would_block(fd, data):
        raise BlockingIOError

    real_aclose = WebSocketConnection.aclose

    async def slow_aclose(self, *args, **kwargs):
        await trio.sleep(0.3)
        await real_aclose(self, *args, **kwargs)

    monkeypatch.setattr(wire.os, "write", would_block)
    monkeypatch.setattr(WebSocketConnection, "aclose", slow_aclose)
    server = await start(nursery, make_config())
    async with open_client(server.url, make_token("bob")) as bob:
        await bob.join("room")
        async with open_client(server.url, make_token("alice")) as alice:
            await alice.join("room")
            for _ in range(10):
                await alice.ws.send_message("not json")
            await trio.sleep(0.1)  # alice's reader has ended; her close is being written
            for n in range(5):
                await bob.send_frame({"type": "send", "room": "room", "data": n})
                assert (await bob.receive())["type"] == "ack"
            assert (await closed_with(alice))[1] == 1008
        assert (await bob.ping())["type"] == "pong"
