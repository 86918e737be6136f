"""The hooks over HTTP (SPEC §14): two ``trio-chat serve`` processes on one redis-server ask a
real HTTP application, examples/hooks_app.py or one of the test's own that misbehaves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11
import httpx
import pytest
import trio
import trustme
from _chat import make_token, spawn
from _redis_server import free_port
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as serve_http
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_recovery import redis_command
from trio_websocket import ConnectionRejected

from trio_chat import Allow, HooksConfig, SendEvent
from trio_chat._hooks.caller import HookFailed
from trio_chat._hooks.http import HttpHooks, signature
from trio_chat.client import ServerError, open_client

if TYPE_CHECKING:
    from starlette.requests import Request

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hooks-secret-for-tests"


def hooks_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "TRIO_CHAT_HOOKS_URL": url,
        "TRIO_CHAT_HOOKS_SECRET": SECRET,
        "TRIO_CHAT_HOOKS_TIMEOUT": "0.5",
        **extra,
    }


async def wait_http(url: str) -> None:
    async with httpx.AsyncClient() as http:
        with trio.fail_after(10):
            while True:
                try:
                    await http.get(url)
                    return
                except httpx.TransportError:
                    await trio.sleep(0.05)


@pytest.fixture
async def hooks_app(tmp_path):
    """examples/hooks_app.py in a process of its own; yields its base URL."""
    port = free_port()
    command = [sys.executable, str(ROOT / "examples" / "hooks_app.py"), "--port", str(port)]
    command += ["--secret", SECRET, "--db", str(tmp_path / "chat.sqlite")]
    with (tmp_path / "app.log").open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=sink)
    try:
        await wait_http(f"http://127.0.0.1:{port}/disconnects")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


@pytest.fixture
async def instances(redis_server, hooks_app, tmp_path):
    """Two instances asking examples/hooks_app.py."""
    env = hooks_env(f"{hooks_app}/hooks")
    one, url1 = await spawn(tmp_path / "one.log", redis_server.url, "one", **env)
    two, url2 = await spawn(tmp_path / "two.log", redis_server.url, "two", **env)
    try:
        yield url1, url2
    finally:
        for process in (one, two):
            process.terminate()
        for process in (one, two):
            assert process.wait(timeout=15) == 0
        for log in ("one.log", "two.log"):
            # one line per connect and disconnect, none per hook call (httpx logs every request)
            assert "HTTP Request" not in (tmp_path / log).read_text()


async def test_the_example_application_decides_on_two_instances(instances, hooks_app):
    url1, url2 = instances
    with trio.fail_after(20):
        with pytest.raises(ConnectionRejected) as refused:
            async with open_client(url1, make_token("mallory")):
                pass
        assert refused.value.status_code == 403
        assert json.loads(refused.value.body) == {
            "error": "forbidden",
            "message": "blocked by the app",
        }
        async with (
            open_client(url1, make_token("alice")) as alice,
            open_client(url2, make_token("bob-smith")) as bob,
        ):
            assert alice.welcome["info"] == {"name": "Alice"}
            assert bob.welcome["info"] == {"name": "Bob Smith"}
            assert (await alice.receive())["type"] == "joined"  # lobby, by the connect hook
            assert (await bob.receive())["type"] == "joined"
            await alice.send("lobby", {"text": "oh heck, hello"})
            got = await bob.receive()
            assert (got["from"], got["data"]) == ("alice", {"text": "oh ****, hello"})

            with pytest.raises(ServerError) as denied:
                await bob.join("staff-room")
            assert denied.value.frame["message"] == "staff only"
            await alice.join("staff-room")
            await bob.join("announcements")
            with pytest.raises(ServerError) as denied:
                await bob.send("announcements", {"text": "me too"})
            assert denied.value.code == "forbidden"
            await alice.join("announcements")
            await alice.send("announcements", {"text": "news"})
            assert (await bob.receive())["data"] == {"text": "news"}
        async with httpx.AsyncClient(base_url=hooks_app) as http:
            stored = (await http.get("/rooms/lobby/messages")).json()
            assert stored == [{"user": "alice", "data": {"text": "oh ****, hello"}}]
            while (await http.get("/disconnects")).json().get("closed", 0) < 2:
                await trio.sleep(0.05)


async def test_the_signature_covers_timestamp_and_body(hooks_app):
    body = json.dumps({"user": "alice", "session": "s", "claims": None, "remote": "x"}).encode()
    timestamp = str(int(time.time()))
    good = signature(SECRET, timestamp, body)
    async with httpx.AsyncClient(base_url=hooks_app) as http:

        async def post(ts: str, content: bytes, sig: str) -> int:
            headers = {"X-Trio-Chat-Timestamp": ts, "X-Trio-Chat-Signature": sig}
            return (await http.post("/hooks/connect", content=content, headers=headers)).status_code

        assert await post(timestamp, body, good) == 200
        assert await post(str(int(timestamp) + 1), body, good) == 401
        assert await post(timestamp, body.replace(b"alice", b"admin"), good) == 401
        assert await post(timestamp, body, signature("wrong", timestamp, body)) == 401
        old = str(int(time.time()) - 3600)
        assert await post(old, body, signature(SECRET, old, body)) == 401  # replayed


async def test_an_application_with_another_secret_refuses_and_connects_fail_closed(
    redis_server, hooks_app, tmp_path
):
    env = hooks_env(f"{hooks_app}/hooks", TRIO_CHAT_HOOKS_SECRET="not-the-apps-secret")
    process, url = await spawn(tmp_path / "one.log", redis_server.url, "one", **env)
    try:
        with trio.fail_after(10), pytest.raises(ConnectionRejected) as refused:
            async with open_client(url, make_token("alice")):
                pass
        assert refused.value.status_code == 503
        assert json.loads(refused.value.body)["error"] == "hooks_unavailable"
        assert await redis_command(redis_server.port, "EXISTS", "ws:user:alice") == 0
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0


class Misbehaving:
    """A hooks application whose every hook answers as ``mode`` says."""

    def __init__(self) -> None:
        self.modes: dict[str, str] = {}
        self.calls: list[str] = []
        self.app = Starlette(routes=[Route("/hooks/{hook}", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        name = request.path_params["hook"]
        await request.body()
        self.calls.append(name)
        match self.modes.get(name, "allow"):
            case "allow":
                return JSONResponse({"allow": True})
            case "slow":
                await trio.sleep(2)
                return JSONResponse({"allow": True})
            case "500":
                return JSONResponse({"allow": True}, status_code=500)
            case "nonjson":
                return Response(b"<html>oops</html>", media_type="text/html")
            case "allow_yes":
                return JSONResponse({"allow": "yes"})
            case "huge":
                return Response(b'{"allow": true, "x": "' + b"x" * 10_000_000 + b'"}')
        raise AssertionError(name)

    async def serve(self, port: int, *, task_status: trio.TaskStatus[None]) -> None:
        config = HypercornConfig()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        await serve_http(self.app, config, task_status=task_status)  # type: ignore[arg-type]


async def test_every_failure_of_the_application_fails_closed(redis_server, nursery, tmp_path):
    app = Misbehaving()
    port = free_port()
    scope = trio.CancelScope()

    async def run_app(*, task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await app.serve(port, task_status=task_status)

    await nursery.start(run_app)
    env = hooks_env(f"http://127.0.0.1:{port}/hooks")
    process, url = await spawn(tmp_path / "one.log", redis_server.url, "one", **env)
    try:
        for mode in ("slow", "500", "nonjson", "allow_yes", "huge", "down"):
            with trio.fail_after(20):
                if mode == "down":
                    scope.cancel()
                    await trio.sleep(0.2)
                app.modes = {"connect": mode}
                with pytest.raises(ConnectionRejected) as refused:
                    async with open_client(url, make_token("alice")):
                        pass
                assert refused.value.status_code == 503, mode
                assert json.loads(refused.value.body)["error"] == "hooks_unavailable"
                assert await redis_command(redis_server.port, "EXISTS", "ws:user:alice") == 0
                if mode == "down":
                    scope = trio.CancelScope()
                    await nursery.start(run_app)
                app.modes = {"send": mode, "join": mode}
                async with open_client(url, make_token("bob")) as bob:
                    with pytest.raises(ServerError) as refused_frame:
                        await bob.join("lobby")
                    assert refused_frame.value.code == "unavailable", mode
                    app.modes = {"send": mode}
                    await bob.join("lobby")
                    with pytest.raises(ServerError) as refused_frame:
                        await bob.send("lobby", "hello")
                    assert refused_frame.value.code == "unavailable", mode
                    assert (await bob.ping())["type"] == "pong"  # the session goes on
                    if mode == "down":
                        scope.cancel()
                assert await redis_command(redis_server.port, "XLEN", "chat:room:lobby") == 0
                if mode == "down":
                    scope = trio.CancelScope()
                    await nursery.start(run_app)
        app.modes = {}
        with trio.fail_after(10):
            async with open_client(url, make_token("carol")) as carol:
                await carol.join("lobby")
                assert (await carol.send("lobby", "works again"))["type"] == "ack"
        assert process.poll() is None
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0
    log = (tmp_path / "one.log").read_text()
    assert "Traceback" not in log
    assert SECRET not in log


# --- the client itself: keep-alive, a connection closed while idle, the bound, TLS -----------


class Raw:
    """An HTTP/1.1 server on a real socket that answers ``{"allow": true}`` and counts the
    connections and requests it sees; ``drop`` lists the requests (1-based, per connection)
    it closes the connection on without answering."""

    def __init__(self, drop: tuple[int, ...] = (), close_after: bool = False) -> None:
        self.drop, self.close_after = drop, close_after
        self.connections = 0
        self.requests = 0
        self.in_flight = self.most_in_flight = 0
        self.delay = 0.0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        served = 0
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.EndOfMessage):
                    served += 1
                    self.requests += 1
                    if served in self.drop:
                        return
                    self.in_flight += 1
                    self.most_in_flight = max(self.most_in_flight, self.in_flight)
                    await trio.sleep(self.delay)
                    self.in_flight -= 1
                    body = b'{"allow": true}'
                    headers = [("content-type", "application/json"), ("content-length", "15")]
                    await stream.send_all(
                        conn.send(h11.Response(status_code=200, headers=headers))
                        + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage())
                    )
                    if self.close_after:
                        return
                    conn.start_next_cycle()

    async def serve(self, nursery: trio.Nursery) -> str:
        serve = partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1")
        [listener] = await nursery.start(serve)
        return f"http://127.0.0.1:{listener.socket.getsockname()[1]}/hooks"


def client(url: str, **settings: Any) -> HttpHooks:
    return HttpHooks(HooksConfig(url=url, secret=SECRET, **settings), "test", 65536)


def event() -> SendEvent:
    return SendEvent(user="alice", session="s", room="lobby", data="hi")


async def test_connections_are_kept_alive_and_a_closed_idle_one_is_not_used(nursery):
    server = Raw()
    hooks = client(await server.serve(nursery))
    for _ in range(5):
        assert await hooks.call("send", event()) == Allow()
    assert (server.connections, server.requests) == (1, 5)
    await hooks.aclose()
    # the application closes each connection after answering: noticed while idle, not used
    closing = Raw(close_after=True)
    hooks = client(await closing.serve(nursery))
    for _ in range(3):
        assert await hooks.call("send", event()) == Allow()
        await trio.sleep(0.05)  # the close reaches us while the connection is idle
    assert (closing.connections, closing.requests) == (3, 3)
    await hooks.aclose()


async def test_a_reused_connection_that_breaks_unanswered_is_tried_once_more(nursery):
    server = Raw(drop=(2,))  # every connection's second request: closed, unanswered
    hooks = client(await server.serve(nursery))
    assert await hooks.call("send", event()) == Allow()
    assert await hooks.call("send", event()) == Allow()  # on a new connection
    assert (server.connections, server.requests) == (2, 3)
    await hooks.aclose()
    # on a new connection, an unanswered request fails (closed) and is not repeated
    first = Raw(drop=(1,))
    hooks = client(await first.serve(nursery))
    with pytest.raises(HookFailed):
        await hooks.call("send", event())
    assert first.requests == 1
    await hooks.aclose()


async def test_at_most_max_concurrency_calls_are_in_flight(nursery):
    server = Raw()
    server.delay = 0.05
    hooks = client(await server.serve(nursery), max_concurrency=3)
    async with trio.open_nursery() as calls:
        for _ in range(12):
            calls.start_soon(hooks.call, "send", event())
    assert server.requests == 12
    assert server.most_in_flight == 3
    assert server.connections == 3
    await hooks.aclose()


async def test_hooks_over_https(nursery, tmp_path, monkeypatch):
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    server = Misbehaving()
    config = HypercornConfig()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    config.certfile, config.keyfile = str(cert), str(key)
    await nursery.start(partial(serve_http, server.app, config))  # type: ignore[arg-type]
    # an untrusted certificate fails closed
    with pytest.raises(HookFailed):
        await client(f"https://127.0.0.1:{port}/hooks").call("send", event())
    # the system's trust store, as OpenSSL finds it (SSL_CERT_FILE), decides
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    hooks = client(f"https://127.0.0.1:{port}/hooks")
    assert await hooks.call("send", event()) == Allow()
    assert await hooks.call("send", event()) == Allow()
    assert server.calls == ["send", "send"]
    await hooks.aclose()
