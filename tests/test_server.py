"""End-to-end tests: real servers (in this process), real sockets, a real redis-server."""

from __future__ import annotations

import gc
import ipaddress
import json
from contextlib import AsyncExitStack

import jwt
import pytest
import trio
from _chat import SECRET, make_config, make_token, open_backend, read_hash, snapshot, start
from trio_websocket import ConnectionClosed, ConnectionRejected

from trio_chat._auth import AuthRecord
from trio_chat._connection import ConnectionHandler, forwarded_client
from trio_chat._hub import Hub
from trio_chat._store.interface import Batch
from trio_chat.client import ServerError, open_client


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return request.getfixturevalue("redis_server").url


async def test_welcome_then_ping(store_url, nursery):
    server = await start(nursery, make_config(store_url))
    with trio.fail_after(5):
        async with open_client(server.url, make_token("alice")) as chat:
            welcome = chat.welcome
            assert welcome["type"] == "welcome"
            assert welcome["user_id"] == "alice"
            assert welcome["instance"] == server.instance_id
            assert len(welcome["session_id"]) >= 22
            assert (await chat.ping()) == {"type": "pong", "ref": 1}


async def test_room_messages_reach_other_sessions_not_the_sender(store_url, nursery):
    server = await start(nursery, make_config(store_url))
    with trio.fail_after(5):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("alice")) as alice_phone,
            open_client(server.url, make_token("bob")) as bob,
        ):
            for chat in (alice, alice_phone, bob):
                joined = await chat.join("lobby")
                assert joined == {
                    "type": "joined",
                    "room": "lobby",
                    "last": None,
                    "read": None,
                    "unread": 0,
                    "ref": 1,
                }
            ack = await alice.send("lobby", {"text": "hi"})
            assert ack["type"] == "ack"
            for chat in (alice_phone, bob):
                message = await chat.receive()
                assert message == {
                    "type": "message",
                    "id": ack["id"],
                    "room": "lobby",
                    "from": "alice",
                    "data": {"text": "hi"},
                    "ts": ack["ts"],
                }
            # the sender's own session gets nothing but the ack: the next frame is the pong
            assert (await alice.ping())["type"] == "pong"
            assert not alice._pending


async def test_fanout_and_multi_device_across_two_instances(redis_server, nursery):
    one = await start(nursery, make_config(redis_server.url, "inst-1"))
    two = await start(nursery, make_config(redis_server.url, "inst-2"))
    with trio.fail_after(10):
        async with (
            open_client(one.url, make_token("alice")) as alice_laptop,
            open_client(two.url, make_token("alice")) as alice_phone,
            open_client(two.url, make_token("bob")) as bob,
            open_client(one.url, make_token("carol")) as carol,
        ):
            for chat in (alice_laptop, alice_phone, bob, carol):
                await chat.join("general")
            for n in range(20):
                await bob.send("general", {"n": n})
            await alice_laptop.send("general", "from laptop")
            for chat in (alice_laptop, alice_phone, carol):
                got = [(await chat.receive())["data"] for _ in range(20)]
                assert got == [{"n": n} for n in range(20)]
            for chat in (alice_phone, bob, carol):
                frame = await chat.receive()
                assert (frame["from"], frame["data"]) == ("alice", "from laptop")


async def test_pubsub_payload_carries_no_token(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url))
    token = make_token("alice")
    async with open_backend(redis_server.url, command_timeout=1) as spy_backend:
        async with spy_backend.subscription() as spy:
            await spy.subscribe("chat:room:secret-room")
            with trio.fail_after(5):
                async with open_client(server.url, token) as alice:
                    await alice.join("secret-room")
                    ack = await alice.send("secret-room", {"text": "psst"})
                channel, payload = await anext(spy.messages())
    assert channel == "chat:room:secret-room"
    assert token not in payload
    assert token.split(".")[2] not in payload  # not even the signature
    event = json.loads(payload)
    assert set(event) == {"id", "room", "from", "session", "data", "ts"}
    assert event["id"] == ack["id"]
    assert event["from"] == "alice"


async def test_direct_is_routed_only_to_instances_holding_the_user(redis_server, nursery):
    one = await start(nursery, make_config(redis_server.url, "inst-1"))
    two = await start(nursery, make_config(redis_server.url, "inst-2"))
    async with open_backend(redis_server.url, command_timeout=1) as spy_backend:
        async with spy_backend.subscription() as spy:
            await spy.subscribe("ws:control:inst-1", "ws:control:inst-2")
            with trio.fail_after(10):
                async with (
                    open_client(one.url, make_token("alice")) as alice,
                    open_client(two.url, make_token("bob")) as bob_laptop,
                    open_client(two.url, make_token("bob")) as bob_phone,
                ):
                    ack = await alice.direct("bob", {"text": "hey"})
                    for chat in (bob_laptop, bob_phone):
                        frame = await chat.receive()
                        assert frame == {
                            "type": "direct",
                            "id": ack["id"],
                            "from": "alice",
                            "data": {"text": "hey"},
                            "ts": ack["ts"],
                        }
                    # a direct to a user with no session is acknowledged and goes nowhere
                    await alice.direct("nobody", "lost")
                    # alice's own instance is one a direct to alice must reach
                    await bob_phone.direct("alice", "back")
                    assert (await alice.receive())["data"] == "back"
                seen = []
                async for channel, payload in spy.messages():
                    seen.append((channel, json.loads(payload)["to"]))
                    if len(seen) == 2:
                        break
    assert seen == [("ws:control:inst-2", "bob"), ("ws:control:inst-1", "alice")]


# --- handshake ---------------------------------------------------------------------------------


# trio-websocket's client (0.12) leaves its socket open when the server refuses the upgrade;
# the garbage collector closes it later with a ResourceWarning. Only refusal tests see it.
leaks_client_socket = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)


async def _refusal(url: str, **kwargs) -> tuple[int, dict[str, str]]:
    with trio.fail_after(5), pytest.raises(ConnectionRejected) as info:
        async with open_client(url, **kwargs):
            pass
    gc.collect()  # close the leaked socket now, inside the test that expects it
    return info.value.status_code, json.loads(info.value.body)


async def _set_auth(redis_url: str, user: str, fields: dict[str, str]) -> None:
    async with open_backend(redis_url, command_timeout=1) as backend:
        batch = Batch()
        batch.hset(f"auth:{user}", fields)
        await backend.execute(batch)


@leaks_client_socket
@pytest.mark.parametrize(
    ("token", "status", "code"),
    [
        (None, 401, "missing_token"),
        ("not-a-jwt", 401, "invalid_token"),
        (make_token("alice", ttl=-60), 401, "token_expired"),
        ("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSJ9.", 401, "invalid_token"),
    ],
    ids=["missing", "garbage", "expired", "alg-none"],
)
async def test_bad_tokens_are_refused_with_401(nursery, token, status, code):
    server = await start(nursery, make_config())
    got_status, body = await _refusal(server.url, token=token)
    assert (got_status, body["error"]) == (status, code)
    assert body["message"]


@leaks_client_socket
async def test_token_claims_are_checked(nursery):
    server = await start(
        nursery, make_config(auth={"issuer": "https://id.example", "audience": "chat"})
    )
    good = {"iss": "https://id.example", "aud": "chat"}
    cases = {
        "wrong signature": jwt.encode(
            {"sub": "a", "iat": 1, "exp": 2**31, **good},
            "other-secret-" + "o" * 64,
            "HS256",
        ),
        "no exp": jwt.encode({"sub": "a", "iat": 1, **good}, SECRET, "HS256"),
        "no iat": jwt.encode({"sub": "a", "exp": 2**31, **good}, SECRET, "HS256"),
        "wrong issuer": make_token("a", iss="https://evil.example", aud="chat"),
        "wrong audience": make_token("a", iss="https://id.example", aud="other"),
        "HS512 not allowed": jwt.encode(
            {"sub": "a", "iat": 1, "exp": 2**31, **good}, SECRET, "HS512"
        ),
        "rooms not a list": make_token("a", rooms="lobby", **good),
    }
    for name, token in cases.items():
        status, body = await _refusal(server.url, token=token)
        assert (name, status, body["error"]) == (name, 401, "invalid_token")
    async with open_client(server.url, make_token("a", **good)) as chat:
        assert chat.welcome["user_id"] == "a"


async def test_every_credential_source_is_accepted(nursery):
    server = await start(nursery, make_config())
    token = make_token("alice")
    with trio.fail_after(5):
        async with open_client(
            server.url, subprotocols=["trio-chat.v1", f"bearer.{token}"]
        ) as chat:
            assert chat.ws.subprotocol == "trio-chat.v1"
        async with open_client(f"{server.url}?token={token}") as chat:
            assert chat.welcome["user_id"] == "alice"
        async with open_client(
            server.url, headers=[("Cookie", f"a=b; trio_chat_token={token}")]
        ) as chat:
            assert chat.welcome["user_id"] == "alice"


@leaks_client_socket
async def test_query_token_can_be_disabled(nursery):
    server = await start(nursery, make_config(auth={"allow_query_token": False}))
    status, body = await _refusal(f"{server.url}?token={make_token('alice')}")
    assert (status, body["error"]) == (401, "missing_token")


@leaks_client_socket
async def test_other_paths_get_404(nursery):
    server = await start(nursery, make_config(server={"path": "/ws"}))
    status, body = await _refusal(server.url.replace("/ws", "/other"), token=make_token("a"))
    assert (status, body["error"]) == (404, "not_found")


@leaks_client_socket
async def test_origin_allow_list(nursery):
    server = await start(nursery, make_config(auth={"allowed_origins": ["https://chat.example"]}))
    token = make_token("alice")
    status, body = await _refusal(
        server.url, token=token, headers=[("Origin", "https://evil.example")]
    )
    assert (status, body["error"]) == (403, "origin_not_allowed")
    async with open_client(server.url, token, headers=[("Origin", "https://chat.example")]):
        pass


@leaks_client_socket
async def test_auth_record_refusals(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url))
    await _set_auth(redis_server.url, "banned-user", {"status": "banned"})
    status, body = await _refusal(server.url, token=make_token("banned-user"))
    assert (status, body["error"]) == (403, "banned")

    issued = 1_700_000_000
    await _set_auth(redis_server.url, "old-token", {"not_before": str(issued + 1)})
    old = make_token("old-token", iat=issued, ttl=10**9)
    assert (await _refusal(server.url, token=old))[0] == 401
    async with open_client(server.url, make_token("old-token")):
        pass  # a token issued after not_before is fine


@leaks_client_socket
async def test_require_record(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url, auth={"require_record": True}))
    status, body = await _refusal(server.url, token=make_token("ghost"))
    assert (status, body["error"]) == (401, "not_logged_in")
    await _set_auth(redis_server.url, "ghost", {"status": "active"})
    async with open_client(server.url, make_token("ghost")):
        pass


@leaks_client_socket
async def test_sessions_per_user_limit(store_url, nursery):
    server = await start(nursery, make_config(store_url, limits={"max_sessions_per_user": 2}))
    token = make_token("alice")
    async with open_client(server.url, token), open_client(server.url, token):
        status, body = await _refusal(server.url, token=token)
        assert (status, body["error"]) == (429, "too_many_sessions")


@leaks_client_socket
async def test_redis_down_at_handshake_is_503(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url))
    redis_server.kill()
    status, body = await _refusal(server.url, token=make_token("alice"))
    assert (status, body["error"]) == (503, "unavailable")


# --- frames and errors -------------------------------------------------------------------------


async def _error(chat, frame: dict) -> dict:
    await chat.send_frame(frame)
    reply = await chat.receive()
    assert reply["type"] == "error", reply
    return reply


async def test_bad_frames_get_error_frames_and_the_connection_stays(store_url, nursery):
    server = await start(nursery, make_config(store_url))
    with trio.fail_after(5):
        async with open_client(server.url, make_token("alice", rooms=["public-*"])) as chat:
            await chat.ws.send_message("{not json")
            assert (await chat.receive())["code"] == "bad_request"
            await chat.ws.send_message("[1, 2]")
            assert (await chat.receive())["code"] == "bad_request"
            cases = [
                ({"type": "join", "ref": 7}, "bad_request"),
                ({"type": "join", "room": "has space", "ref": 8}, "bad_request"),
                ({"type": "join", "room": "x" * 129, "ref": 9}, "bad_request"),
                ({"type": "send", "room": "public-1", "ref": 10}, "bad_request"),
                ({"type": "fly", "ref": 11}, "unknown_type"),
                ({"type": "send", "room": "public-1", "data": 1, "ref": 12}, "not_in_room"),
                ({"type": "join", "room": "private", "ref": 13}, "forbidden"),
            ]
            for frame, code in cases:
                reply = await _error(chat, frame)
                assert (reply["code"], reply["ref"]) == (code, frame["ref"])
                assert reply["message"]
            assert await chat.join("public-1")
            assert (await chat.ping())["type"] == "pong"


async def test_a_muted_user_reads_but_cannot_speak(redis_server, nursery):
    # SPEC §6: a mute silences, it does not blind: join, leave and reading go on
    server = await start(nursery, make_config(redis_server.url, auth={"cache_ttl": 0}))
    async with (
        open_client(server.url, make_token("alice")) as alice,
        open_client(server.url, make_token("bob")) as bob,
    ):
        await alice.join("room")
        await bob.join("room")
        await _set_auth(redis_server.url, "alice", {"muted_until": str(2**31)})
        for speak in (lambda: alice.send("room", "hello"), lambda: alice.direct("bob", "hi")):
            with pytest.raises(ServerError) as info:
                await speak()
            assert info.value.code == "muted"
        assert (await alice.join("other"))["type"] == "joined"
        assert (await alice.leave("other"))["type"] == "left"
        await bob.send("room", "to the muted")
        assert (await alice.receive())["data"] == "to the muted"
        await _set_auth(redis_server.url, "alice", {"muted_until": "0"})
        assert (await alice.send("room", "hello"))["type"] == "ack"


async def test_too_large_for_recipients(store_url, nursery):
    server = await start(nursery, make_config(store_url, limits={"max_message_bytes": 1000}))
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("room")
        frame = {"type": "send", "room": "room", "data": "x" * 900, "ref": 1}
        assert len(json.dumps(frame)) < 1000
        reply = await _error(chat, frame)
        assert reply["code"] == "too_large"


async def test_oversized_frame_closes_1009(store_url, nursery):
    server = await start(nursery, make_config(store_url, limits={"max_message_bytes": 1000}))
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.ws.send_message("x" * 1001)
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
            await chat.receive()
        assert info.value.reason.code == 1009


async def test_pipelined_sends_are_published_and_answered_in_order(store_url, nursery):
    # The read loop does not wait for a send's PUBLISH: sends written back to back go out in
    # batches, in order, and every other reply waits for the acks of the sends before it.
    server = await start(nursery, make_config(store_url, limits={"send_burst": 100}))
    with trio.fail_after(10):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            for chat in (alice, bob):
                await chat.join("room")
            frames = [{"type": "send", "room": "room", "data": n, "ref": n} for n in range(60)]
            frames[20] = {"type": "send", "room": "elsewhere", "data": 20, "ref": 20}  # refused
            frames[40] = {"type": "ping", "ref": 40}
            for frame in frames:
                await alice.send_frame(frame)
            await alice.send_frame({"type": "join", "room": "second", "ref": 60})
            replies = [json.loads(await alice.ws.get_message()) for _ in range(61)]
            assert [reply.get("ref") for reply in replies] == list(range(61))
            assert replies[20]["code"] == "not_in_room"
            assert (replies[40]["type"], replies[60]["type"]) == ("pong", "joined")
            assert {reply["type"] for reply in replies[:20] + replies[21:40]} == {"ack"}
            sent = [n for n in range(60) if n not in (20, 40)]
            assert [(await bob.receive())["data"] for _ in sent] == sent


async def test_a_send_refused_by_a_ban_closes_after_the_acks_before_it(
    store_url, nursery, monkeypatch
):
    # The sends before the refused one are published; their acks go out before the logout.
    calls = 0
    auth_record = Hub.auth_record

    async def banned_after_eleven_checks(self, user_id):
        nonlocal calls
        calls += 1  # the join's check, then one per send
        return AuthRecord(status="banned") if calls > 11 else await auth_record(self, user_id)

    monkeypatch.setattr(Hub, "auth_record", banned_after_eleven_checks)
    server = await start(nursery, make_config(store_url, limits={"send_burst": 100}))
    with trio.fail_after(10):
        async with open_client(server.url, make_token("alice")) as alice:
            await alice.join("room")
            for n in range(20):
                await alice.send_frame({"type": "send", "room": "room", "data": n, "ref": n})
            frames = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(json.loads(await alice.ws.get_message()))
    assert [(frame["type"], frame["ref"]) for frame in frames[:10]] == [
        ("ack", n) for n in range(10)
    ]
    assert frames[10:] == [{"type": "logout", "reason": "banned"}]
    assert closed.value.reason.code == 4403


async def test_sends_just_before_the_client_leaves_are_still_published(store_url, nursery):
    server = await start(nursery, make_config(store_url, limits={"send_burst": 100}))
    with trio.fail_after(10):
        async with open_client(server.url, make_token("bob")) as bob:
            await bob.join("room")
            async with open_client(server.url, make_token("alice")) as alice:
                await alice.join("room")
                for n in range(30):
                    await alice.send_frame({"type": "send", "room": "room", "data": n})
            # alice closed without reading a single ack
            assert [(await bob.receive())["data"] for _ in range(30)] == list(range(30))


async def test_a_steady_stream_to_a_large_room_is_written_once_per_write_delay(store_url, nursery):
    # 16 local subscribers make a "wide" burst: after the first message, the next ones in the
    # same write_delay are held and written together when it has passed, in order.
    delay = 0.3
    server = await start(
        nursery,
        make_config(store_url, server={"write_delay": delay}, limits={"send_burst": 100}),
    )
    arrivals = {}

    async def subscriber(n, task_status):
        async with open_client(server.url, make_token(f"u{n}")) as chat:
            await chat.join("big")
            task_status.started()
            arrivals[n] = [((await chat.receive())["data"], trio.current_time()) for _ in range(3)]

    with trio.fail_after(10):
        async with trio.open_nursery() as subscribers:
            for n in range(16):
                await subscribers.start(subscriber, n)
            async with open_client(server.url, make_token("sender")) as sender:
                await sender.join("big")
                for k in range(3):
                    await sender.send("big", k)
    for got in arrivals.values():
        assert [data for data, _ in got] == [0, 1, 2]
        (_, first), (_, second), (_, third) = got
        assert second - first >= delay * 0.9  # held until the delay had passed
        assert third - second < delay * 0.5  # and written together with the one after it


async def test_send_while_redis_is_down_is_an_error(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url))
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("room")
        redis_server.kill()
        with trio.fail_after(5), pytest.raises(ServerError) as info:
            await chat.send("room", "hello")
        assert info.value.code == "unavailable"
        assert (await chat.ping())["type"] == "pong"


async def test_internal_error_is_an_error_frame(nursery, monkeypatch):
    async def broken(self, session, message):
        raise RuntimeError("bug")

    monkeypatch.setattr(ConnectionHandler, "_leave", broken)
    server = await start(nursery, make_config())
    async with open_client(server.url, make_token("alice")) as chat:
        with pytest.raises(ServerError) as info:
            await chat.leave("room")
        assert (info.value.code, info.value.frame["message"]) == ("internal", "internal error")
        assert (await chat.ping())["type"] == "pong"


# --- cleanup -----------------------------------------------------------------------------------


async def _assert_registered(backend, instance_id, user, session_id, room, *, present):
    batch = Batch()
    in_user = batch.smembers(f"ws:user:{user}")
    in_instance = batch.hgetall(f"ws:instance:{instance_id}:sessions")
    in_room = batch.zrangebyscore(f"ws:room:{room}", 0, float("inf"))
    session = batch.hgetall(f"ws:session:{session_id}")
    await backend.execute(batch)
    found = (
        session_id in in_user.value,
        session_id in in_instance.value,
        session_id in in_room.value,
        bool(session.value),
    )
    assert found == (present,) * 4


async def test_session_records_written_and_removed_on_close(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url, "inst-1"))
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        async with open_client(server.url, make_token("alice")) as chat:
            await chat.join("room")
            sid = chat.welcome["session_id"]
            record = await read_hash(backend, f"ws:session:{sid}")
            assert record["user_id"] == "alice"
            assert record["instance"] == "inst-1"
            assert json.loads(record["rooms"]) == ["room"]
            assert int(record["token_exp"]) == chat.welcome["expires_at"]
            assert record["remote"].startswith("127.0.0.1:")
            await _assert_registered(backend, "inst-1", "alice", sid, "room", present=True)
        with trio.fail_after(5):
            while (await snapshot(backend, f"ws:session:{sid}"))[f"ws:session:{sid}"]:
                await trio.sleep(0.01)
        await _assert_registered(backend, "inst-1", "alice", sid, "room", present=False)


async def test_session_records_removed_when_the_connection_task_raises(
    redis_server, nursery, monkeypatch
):
    async def crash(self, session):
        await session.ws.get_message()
        raise RuntimeError("boom")

    monkeypatch.setattr(ConnectionHandler, "_read_loop", crash)
    server = await start(nursery, make_config(redis_server.url, "inst-1"))
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        async with open_client(server.url, make_token("alice")) as chat:
            sid = chat.welcome["session_id"]
            await chat.send_frame({"type": "ping"})
            with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
                await chat.receive()
            assert info.value.reason.code == 1011
        await _assert_registered(backend, "inst-1", "alice", sid, "room", present=False)
        # the server survived the crash
        async with open_client(server.url, make_token("bob")) as chat:
            assert chat.welcome["user_id"] == "bob"


async def test_session_and_instance_records_removed_on_cancellation(redis_server):
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        async with trio.open_nursery() as nursery:
            server = await start(nursery, make_config(redis_server.url, "inst-1"))
            async with open_client(server.url, make_token("alice")) as chat:
                await chat.join("room")
                sid = chat.welcome["session_id"]
                assert (await snapshot(backend, "ws:instance:inst-1"))["ws:instance:inst-1"]
                nursery.cancel_scope.cancel()
        await _assert_registered(backend, "inst-1", "alice", sid, "room", present=False)
        left = await snapshot(backend, "ws:instance:inst-1", "ws:instance:inst-1:sessions")
        assert left == {"ws:instance:inst-1": 0, "ws:instance:inst-1:sessions": 0}
        batch = Batch()
        instances = batch.smembers("ws:instances")
        await backend.execute(batch)
        assert "inst-1" not in instances.value


async def test_slow_consumer_is_closed_1008_while_others_keep_receiving(redis_server, nursery):
    server = await start(
        nursery,
        make_config(
            redis_server.url, limits={"outbound_queue": 4, "send_rate": 1e6, "frame_rate": 1e6}
        ),
    )
    blob = "x" * 32_000
    count = 400  # ~13 MB: more than the socket buffers between the server and a stalled reader
    with trio.fail_after(30):
        async with (
            open_client(server.url, make_token("sender")) as sender,
            open_client(server.url, make_token("fast")) as fast,
            open_client(server.url, make_token("slow")) as slow,
        ):
            for chat in (sender, fast, slow):
                await chat.join("firehose")

            async def read_all() -> None:
                for n in range(count):
                    assert (await fast.receive())["data"] == [n, blob]

            async with trio.open_nursery() as readers:
                readers.start_soon(read_all)
                for n in range(count):
                    await sender.send("firehose", [n, blob])
            # the slow client never read; now it does: some messages, then the close
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await slow.receive()
            assert info.value.reason.code == 1008


async def test_first_joins_at_once_share_subscribe_round_trips(redis_server, nursery, monkeypatch):
    # A reconnect storm is first joins of many rooms at once: one SUBSCRIBE at a time, one
    # room each, would be the instance's limit. Those that wait meanwhile go in one SUBSCRIBE.
    import trio_chat._store.redis

    subscribes: list[int] = []
    subscribe = trio_chat._store.redis.RedisSubscription.subscribe

    async def counted(self, *channels):
        subscribes.append(len(channels))
        await subscribe(self, *channels)

    monkeypatch.setattr(trio_chat._store.redis.RedisSubscription, "subscribe", counted)
    server = await start(nursery, make_config(redis_server.url))
    rooms = [f"storm-{n}" for n in range(40)]
    with trio.fail_after(10):
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(open_client(server.url, make_token(room)))
                for room in rooms
            ]
            subscribes.clear()  # the pump's own channels
            async with trio.open_nursery() as joins:  # a client each, as after a restart
                for chat, room in zip(clients, rooms, strict=True):
                    joins.start_soon(chat.join, room)
            first_joins = list(subscribes)
            # every room is subscribed: each client hears another in its room
            async with open_client(server.url, make_token("echo")) as echo:
                for chat, room in zip(clients, rooms, strict=True):
                    await echo.join(room)
                    sent = await echo.send(room, room)
                    assert (await chat.receive())["id"] == sent["id"]
    assert sum(first_joins) == len(rooms)
    assert len(first_joins) <= 4, first_joins  # 40 joins, a handful of round trips


PROXIES = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        # what the client wrote itself (left of the last untrusted hop) proves nothing
        ("127.0.0.1", ["6.6.6.6, 203.0.113.7, 10.1.2.3"], "203.0.113.7"),
        ("10.0.0.5", ["6.6.6.6", "203.0.113.7"], "203.0.113.7"),  # two headers: one list
        ("127.0.0.1", [" 2001:db8::1 "], "2001:db8::1"),
        ("127.0.0.1", ["10.0.0.9, 10.0.0.8"], "10.0.0.9"),  # only proxies: the first
        ("192.0.2.1", ["203.0.113.7"], None),  # a peer we do not trust: its header is ignored
        ("127.0.0.1", [], None),
        ("127.0.0.1", ["203.0.113.7, not-an-address"], None),
    ],
)
def test_the_client_address_from_x_forwarded_for(peer, forwarded, client):
    headers = [(b"host", b"chat"), *((b"X-Forwarded-For", v.encode()) for v in forwarded)]
    assert forwarded_client(peer, headers, PROXIES) == client


async def test_a_trusted_proxy_names_the_session_remote_and_no_one_else_does(redis_server, nursery):
    proxied = await start(
        nursery, make_config(redis_server.url, "inst-1", server={"trusted_proxies": ["127.0.0.1"]})
    )
    direct = await start(nursery, make_config(redis_server.url, "inst-2"))
    header = [("X-Forwarded-For", "198.51.100.4, 203.0.113.7")]
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        for server, remote in ((proxied, "203.0.113.7"), (direct, "127.0.0.1:")):
            async with open_client(server.url, make_token("alice"), headers=header) as chat:
                record = await read_hash(backend, f"ws:session:{chat.welcome['session_id']}")
                assert record["remote"].startswith(remote), record["remote"]
                assert record["remote"] != "198.51.100.4"
