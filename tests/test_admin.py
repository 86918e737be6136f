"""The admin HTTP API (SPEC §9), over real sockets, against real instances and a real Redis."""

from __future__ import annotations

import json
import math
import time
from importlib import resources

import httpx
import pytest
import trio
from _chat import ADMIN, ADMIN_KEY, admin_client, make_config, make_token, read_hash, start
from _chat import closed_with as _closed_with
from trio_websocket import ConnectionRejected

from trio_chat._cli import main as _cli
from trio_chat._hub import Hub
from trio_chat._store.backends import open_backend
from trio_chat._web.admin import create_app
from trio_chat.client import ServerError, open_client

OPENAPI = json.loads(resources.files("trio_chat._web").joinpath("openapi.json").read_bytes())

#: every /v1 operation, with a body that would be accepted
V1 = [
    ("POST", "/v1/publish", {"room": "lobby", "data": 1}),
    ("POST", "/v1/users/alice/logout", None),
    ("POST", "/v1/users/alice/ban", None),
    ("POST", "/v1/users/alice/unban", None),
    ("POST", "/v1/users/alice/mute", {"seconds": 5}),
    ("GET", "/v1/users/alice/sessions", None),
    ("DELETE", "/v1/sessions/abc", None),
    ("GET", "/v1/rooms/lobby/presence", None),
    ("GET", "/v1/instances", None),
]


async def _admin_server(nursery, redis_server, instance_id="inst-1", **sections):
    return await start(nursery, make_config(redis_server.url, instance_id, admin=ADMIN, **sections))


def test_openapi_documents_every_route_and_no_other():
    app = create_app(make_config(admin=ADMIN), hub=None)
    served = {
        (method, route.path.replace(":path", ""))
        for route in app.routes
        for method in route.methods - {"HEAD"}
    }
    documented = {
        (method.upper(), path)
        for path, item in OPENAPI["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert served == documented


# --- open endpoints, keys, errors ---------------------------------------------------------------


async def test_open_endpoints(redis_server, nursery):
    server = await _admin_server(nursery, redis_server)
    with trio.fail_after(10):
        async with admin_client(server, key=None) as http:
            assert (r := await http.get("/healthz")).status_code == 200
            assert r.json() == {"status": "ok"}
            assert (r := await http.get("/readyz")).status_code == 200
            assert r.json() == {"status": "ready"}
            assert (r := await http.get("/metrics")).status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            assert "trio_chat_" in r.text
            assert (r := await http.get("/openapi.json")).status_code == 200
            assert r.json() == OPENAPI


async def test_v1_needs_the_bearer_key(redis_server, nursery):
    server = await _admin_server(nursery, redis_server)
    with trio.fail_after(10):
        for key in (None, "wrong", ADMIN_KEY + "x", ADMIN_KEY[:-1]):
            async with admin_client(server, key=key) as http:
                for method, path, body in V1:
                    r = await http.request(method, path, json=body)
                    assert r.status_code == 401, (key, path)
                    assert r.json()["error"] == "unauthorized"
                    assert r.headers["www-authenticate"] == "Bearer"
        async with admin_client(server, key=None) as http:
            for authorization in (f"Basic {ADMIN_KEY}", "Bearer ünï".encode("latin-1"), b"Bearer"):
                r = await http.get("/v1/instances", headers={"Authorization": authorization})
                assert r.status_code == 401
        async with admin_client(server) as http:
            for method, path, body in V1:
                r = await http.request(method, path, json=body)
                assert r.status_code in (200, 404), path  # 404: the session "abc"
                assert r.headers["content-type"] == "application/json"


async def test_v1_is_locked_without_a_configured_key(redis_server, nursery):
    admin = {**ADMIN, "api_key": None}
    server = await start(nursery, make_config(redis_server.url, admin=admin))
    with trio.fail_after(10):
        async with admin_client(server, key="anything") as http:
            r = await http.get("/v1/instances")
            assert r.status_code == 401
            assert "not configured" in r.json()["message"]


async def test_bad_requests_are_json(redis_server, nursery):
    server = await _admin_server(nursery, redis_server)
    cases = [
        ("POST", "/v1/publish", b"{not json", 400),
        ("POST", "/v1/publish", b"\xff\xfe", 400),
        ("POST", "/v1/publish", b'{"room": "r", "data": NaN}', 400),
        ("POST", "/v1/publish", b'{"room": "r", "data": 1e400}', 400),
        ("POST", "/v1/publish", b"", 400),
        ("POST", "/v1/publish", b"[]", 422),
        ("POST", "/v1/publish", b'{"data": 1}', 422),
        ("POST", "/v1/publish", b'{"room": "no spaces", "data": 1}', 422),
        ("POST", "/v1/publish", b'{"room": 7, "data": 1}', 422),
        ("POST", "/v1/publish", b'{"room": "lobby"}', 422),
        ("POST", "/v1/publish", b'{"room": "r", "data": "' + b"x" * 70_000 + b'"}', 413),
        # under the body limit, but the payload with id, from, session and ts is over it
        ("POST", "/v1/publish", b'{"room": "r", "data": "' + b"x" * 65_500 + b'"}', 413),
        ("POST", "/v1/users/alice/mute", b"{}", 422),
        ("POST", "/v1/users/alice/mute", b'{"seconds": "5"}', 422),
        ("POST", "/v1/users/alice/mute", b'{"seconds": true}', 422),
        ("POST", "/v1/users/alice/mute", b'{"seconds": 0}', 422),
        ("POST", "/v1/users/alice/mute", b'{"seconds": -1}', 422),
        ("POST", "/v1/users/alice/mute", b'{"seconds": 31536001}', 422),
        ("POST", "/v1/users/a%09b/ban", b"", 400),
        ("POST", "/v1/users/a%C2%85b/ban", b"", 400),
        ("POST", "/v1/users/" + "%C3%A9" * 129 + "/logout", b"", 400),
        ("GET", "/v1/rooms/no%20spaces/presence", b"", 400),
        ("DELETE", "/v1/sessions/a.b", b"", 400),
        ("GET", "/v1/nothing", b"", 404),
        ("GET", "/v1/publish", b"", 405),
        ("DELETE", "/healthz", b"", 405),
    ]
    with trio.fail_after(10):
        async with admin_client(server) as http:
            for method, path, content, status in cases:
                r = await http.request(method, path, content=content)
                assert r.status_code == status, (path, content[:40], r.text)
                assert set(r.json()) == {"error", "message"}
            r = await http.get("/v1/publish")
            assert r.headers["allow"] == "POST"


# --- operations -----------------------------------------------------------------------------------


async def test_publish_reaches_the_room_as_a_message_from_admin(redis_or_cluster, nursery):
    server = await _admin_server(nursery, redis_or_cluster)
    async with open_backend(redis_or_cluster.url, command_timeout=1) as spy_backend:
        async with spy_backend.subscription() as spy:
            await spy.subscribe("chat:room:lobby")
            with trio.fail_after(10):
                async with (
                    open_client(server.url, make_token("bob")) as bob,
                    admin_client(server) as http,
                ):
                    await bob.join("lobby")
                    r = await http.post("/v1/publish", json={"room": "lobby", "data": {"t": 1}})
                    assert r.status_code == 200
                    assert set(r.json()) == {"id", "ts"}
                    message = await bob.receive()
                    channel, payload = await anext(spy.messages())
    assert message == {
        "type": "message",
        "id": r.json()["id"],
        "room": "lobby",
        "from": None,
        "data": {"t": 1},
        "ts": r.json()["ts"],
    }
    assert channel == "chat:room:lobby"
    event = json.loads(payload)
    assert event == {**r.json(), "room": "lobby", "from": None, "session": None, "data": {"t": 1}}


async def test_logout_closes_the_user_on_two_instances(redis_or_cluster, nursery):
    one = await _admin_server(nursery, redis_or_cluster, "inst-1")
    two = await _admin_server(nursery, redis_or_cluster, "inst-2")
    with trio.fail_after(10):
        async with (
            open_client(one.url, make_token("alice")) as laptop,
            open_client(two.url, make_token("alice")) as phone,
            open_client(two.url, make_token("bob")) as bob,
            admin_client(one) as http,
        ):
            before = time.time()
            r = await http.post("/v1/users/alice/logout")
            assert (r.status_code, r.json()) == (200, {"closed": 2})
            for chat in (laptop, phone):
                assert await _closed_with(chat) == ([{"type": "logout", "reason": "logout"}], 4000)
            assert (await bob.ping())["type"] == "pong"
            async with open_backend(redis_or_cluster.url, command_timeout=1) as backend:
                record = await read_hash(backend, "auth:alice")
            assert math.ceil(before) <= int(record["not_before"]) <= math.ceil(time.time())
            # a token issued before the logout is revoked
            with pytest.raises(ConnectionRejected) as refused:
                async with open_client(one.url, make_token("alice", iat=before - 1)):
                    pass
            assert refused.value.status_code == 401
            # logging out nobody closes nothing
            assert (await http.post("/v1/users/nobody/logout")).json() == {"closed": 0}


async def test_logout_deletes_the_record_when_one_is_required(redis_server, nursery):
    server = await _admin_server(nursery, redis_server, auth={"require_record": True})
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        with trio.fail_after(10):
            async with admin_client(server) as http:
                assert (await http.post("/v1/users/alice/logout")).json() == {"closed": 0}
                assert await read_hash(backend, "auth:alice") == {}  # not created
                r = await http.post("/v1/users/alice/mute", json={"seconds": 5})
                assert (r.status_code, r.json()["error"]) == (404, "no_record")
                assert (await http.post("/v1/users/alice/unban")).status_code == 404
                assert await read_hash(backend, "auth:alice") == {}


async def test_ban_closes_and_refuses_then_unban_lets_in(redis_or_cluster, nursery):
    one = await _admin_server(nursery, redis_or_cluster, "inst-1")
    two = await _admin_server(nursery, redis_or_cluster, "inst-2")
    with trio.fail_after(10):
        async with admin_client(two) as http:
            async with (
                open_client(one.url, make_token("alice")) as laptop,
                open_client(two.url, make_token("alice")) as phone,
            ):
                r = await http.post("/v1/users/alice/ban")
                assert r.json() == {"closed": 2}
                for chat in (laptop, phone):
                    assert await _closed_with(chat) == (
                        [{"type": "logout", "reason": "banned"}],
                        4403,
                    )
            with pytest.raises(ConnectionRejected) as refused:
                async with open_client(one.url, make_token("alice")):
                    pass
            assert refused.value.status_code == 403
            assert json.loads(refused.value.body)["error"] == "banned"
            r = await http.post("/v1/users/alice/unban")
            assert r.json() == {"user_id": "alice", "status": "active"}
            async with open_client(one.url, make_token("alice")) as chat:
                assert (await chat.ping())["type"] == "pong"


async def test_mute_applies_to_the_next_send(redis_or_cluster, nursery):
    # a long cache: only auth:changed can make the mute visible at once
    server = await _admin_server(nursery, redis_or_cluster, auth={"cache_ttl": 60})
    with trio.fail_after(10):
        async with (
            open_client(server.url, make_token("alice")) as chat,
            admin_client(server) as http,
        ):
            await chat.join("room")
            await chat.send("room", "warm the cache")
            r = await http.post("/v1/users/alice/mute", json={"seconds": 30.5})
            until = r.json()["muted_until"]
            assert time.time() + 30 <= until <= time.time() + 32
            with pytest.raises(ServerError) as refused:
                await chat.send("room", "hello")
            assert refused.value.code == "muted"


async def test_sessions_and_kick_one(redis_or_cluster, nursery):
    one = await _admin_server(nursery, redis_or_cluster, "inst-1")
    two = await _admin_server(nursery, redis_or_cluster, "inst-2")
    with trio.fail_after(10):
        async with (
            open_client(one.url, make_token("alice")) as laptop,
            open_client(two.url, make_token("alice")) as phone,
            admin_client(one) as http,
        ):
            await phone.join("lobby")
            sessions = (await http.get("/v1/users/alice/sessions")).json()["sessions"]
            by_id = {s["session_id"]: s for s in sessions}
            assert set(by_id) == {laptop.welcome["session_id"], phone.welcome["session_id"]}
            mine = by_id[phone.welcome["session_id"]]
            assert (mine["user_id"], mine["instance"], mine["rooms"]) == (
                "alice",
                "inst-2",
                ["lobby"],
            )
            assert isinstance(mine["connected_at"], int)
            assert isinstance(mine["token_exp"], int)

            r = await http.delete(f"/v1/sessions/{phone.welcome['session_id']}")
            assert r.json() == {"closed": 1}
            assert await _closed_with(phone) == ([{"type": "logout", "reason": "kicked"}], 4000)
            assert (await laptop.ping())["type"] == "pong"
            r = await http.delete(f"/v1/sessions/{phone.welcome['session_id']}")
            assert (r.status_code, r.json()["error"]) == (404, "not_found")
            r = await http.get("/v1/users/bob/sessions")
            assert r.json() == {"sessions": []}


async def test_presence_and_instances(redis_or_cluster, nursery):
    one = await _admin_server(nursery, redis_or_cluster, "inst-1")
    two = await _admin_server(nursery, redis_or_cluster, "inst-2")
    with trio.fail_after(10):
        async with (
            open_client(two.url, make_token("bob")) as bob,
            open_client(two.url, make_token("carol")) as carol,
            admin_client(one) as http,
        ):
            await bob.join("lobby")
            await carol.join("elsewhere")
            r = await http.get("/v1/rooms/lobby/presence")
            assert r.json() == {
                "room": "lobby",
                "sessions": [
                    {"session_id": bob.welcome["session_id"], "user_id": "bob", "info": None}
                ],
                "users": ["bob"],
            }
            instances = (await http.get("/v1/instances")).json()["instances"]
            assert [(i["instance_id"], i["alive"], i["sessions"]) for i in instances] == [
                ("inst-1", True, 0),
                ("inst-2", True, 2),
            ]
            assert instances[1]["port"] == two.port


async def test_readyz_follows_redis(redis_server, nursery):
    server = await _admin_server(nursery, redis_server)
    async with admin_client(server) as http:
        with trio.fail_after(10):
            redis_server.kill()
            r = await http.get("/readyz")
            assert r.status_code == 503
            assert r.json()["status"] == "not_ready"
            assert "redis_unreachable" in r.json()["reasons"]
            r = await http.get("/v1/instances")
            assert (r.status_code, r.json()["error"]) == (503, "unavailable")
            assert (await http.get("/healthz")).status_code == 200
        with trio.fail_after(15):
            redis_server.start()
            while (r := await http.get("/readyz")).status_code != 200:
                await trio.sleep(0.1)
            assert r.json() == {"status": "ready"}


async def test_readyz_reports_draining_and_a_stale_pump(nursery):
    config = make_config(admin=ADMIN)
    async with open_backend("memory://", command_timeout=1) as backend:
        hub = Hub(config, backend)
        transport = httpx.ASGITransport(app=create_app(config, hub))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
            with trio.fail_after(5):
                r = await http.get("/readyz")  # the pump has not run yet
                assert (r.status_code, r.json()["reasons"]) == (503, ["pubsub_stale"])
                await nursery.start(hub.run)
                assert (await http.get("/readyz")).status_code == 200
                hub.draining = True
                r = await http.get("/readyz")
                assert (r.status_code, r.json()["reasons"]) == (503, ["draining"])
        nursery.cancel_scope.cancel()


async def test_metrics_serves_what_the_renderer_returns():
    config = make_config(admin=ADMIN)
    body, content_type = b"trio_chat_up 1\n", "text/plain; version=0.0.4; charset=utf-8"
    app = create_app(config, hub=None, metrics=lambda: (body, content_type))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
        r = await http.get("/metrics")
    assert (r.status_code, r.content, r.headers["content-type"]) == (200, body, content_type)


# --- the whole API, fuzzed from its OpenAPI description ----------------------------------------


def _fuzz(base_url: str) -> dict[str, int]:
    """Run schemathesis over every operation; return how many requests each one got.

    Blocking (requests underneath): the test runs it in a worker thread while the server runs
    in the test's trio loop.
    """
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_dict(OPENAPI)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    settings = hypothesis.settings(
        max_examples=30,
        deadline=None,
        database=None,  # no .hypothesis/ directory
        derandomize=True,  # the same cases on every run
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    calls: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=base_url, headers=headers, checks=checks)
                calls[case.operation.label] = calls.get(case.operation.label, 0) + 1

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                assert mode.is_negative  # no parameter and no body: nothing to make invalid
    return calls


async def test_schemathesis_finds_no_server_error(redis_server, nursery):
    server = await _admin_server(nursery, redis_server)
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("lobby")  # a live session and a room, not an empty server
        with trio.fail_after(60):
            calls = await trio.to_thread.run_sync(_fuzz, server.admin_url)
    assert len(calls) == len(OPENAPI["paths"])
    assert calls["POST /v1/publish"] >= 30


# --- the command line -----------------------------------------------------------------------------


async def test_cli_sessions_logout_and_errors(redis_server, nursery, monkeypatch, capsys):
    server = await _admin_server(nursery, redis_server)
    monkeypatch.setenv("TRIO_CHAT_ADMIN_API_KEY", ADMIN_KEY)
    url = ["--admin-url", server.admin_url]
    with trio.fail_after(10):
        async with open_client(server.url, make_token("alice")) as chat:
            code = await trio.to_thread.run_sync(_cli.main, ["sessions", "alice", *url])
            out = json.loads(capsys.readouterr().out)
            assert code == 0
            assert [s["session_id"] for s in out["sessions"]] == [chat.welcome["session_id"]]
            code = await trio.to_thread.run_sync(_cli.main, ["logout", "alice", *url])
            assert (code, json.loads(capsys.readouterr().out)) == (0, {"closed": 1})
            await _closed_with(chat)
        monkeypatch.setenv("TRIO_CHAT_ADMIN_API_KEY", "wrong")
        code = await trio.to_thread.run_sync(_cli.main, ["ban", "alice", *url])
        captured = capsys.readouterr()
        assert code == 1
        assert captured.out == ""
        assert captured.err.count("\n") == 1
        assert "401" in captured.err
        assert "unauthorized" in captured.err


def _samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def test_metrics_move_as_traffic_flows(redis_server, nursery):
    server = await _admin_server(nursery, redis_server)
    async with admin_client(server, key=None) as http:
        before = _samples((await http.get("/metrics")).text)
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            for chat in (alice, bob):
                await chat.join("room")
            for n in range(5):
                await alice.send("room", n)
                await bob.receive()
            await alice.ws.send_message("not json")
            await alice.receive()
            during = _samples((await http.get("/metrics")).text)
        with pytest.raises(ConnectionRejected):
            async with open_client(server.url, "garbage"):
                pass
        after = _samples((await http.get("/metrics")).text)

    def grew(series: str, by: float, sample: dict[str, float] = after) -> None:
        assert sample[series] - before[series] == by, series

    grew('trio_chat_handshakes_total{outcome="accepted"}', 2)
    grew('trio_chat_handshakes_total{outcome="invalid_token"}', 1)
    grew('trio_chat_frames_in_total{type="send"}', 5)
    grew('trio_chat_frames_in_total{type="join"}', 2)
    grew('trio_chat_frames_in_total{type="invalid"}', 1)
    grew("trio_chat_fanout_deliveries_total", 5)
    grew("trio_chat_publish_seconds_count", 5)
    assert during["trio_chat_connections"] == 2
    assert during["trio_chat_sessions"] == 2


async def test_redis_up_follows_the_heartbeat(redis_server, nursery):
    config = make_config(
        redis_server.url, admin=ADMIN, session={"ttl": 0.6}, redis={"command_timeout": 0.2}
    )
    server = await start(nursery, config)

    async def redis_up() -> float:
        return _samples((await http.get("/metrics")).text)["trio_chat_redis_up"]

    async def until(value: float) -> None:
        while await redis_up() != value:
            await trio.sleep(0.05)

    with trio.fail_after(10):
        async with admin_client(server, key=None) as http:
            assert await redis_up() == 1
            redis_server.pause()
            try:
                await until(0)  # the next heartbeat round (every 0.2 s) could not reach Redis
            finally:
                redis_server.resume()
            await until(1)
