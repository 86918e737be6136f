"""How sessions end, or should end, across instances and through faults (SPEC §4, §7, §8)."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import coredis
import pytest
import trio
from _chat import closed_with as _closed_with
from _chat import make_config, make_token, open_backend, snapshot, spawn, start
from trio_websocket import ConnectionRejected

from trio_chat import Config
from trio_chat._hub import Hub
from trio_chat._reaper import sweep
from trio_chat._store.interface import Batch
from trio_chat.client import ServerError, open_client

if TYPE_CHECKING:
    import subprocess


async def _publish(redis_url: str, channel: str, event: dict, **auth_fields: str) -> None:
    async with open_backend(redis_url, command_timeout=1) as backend:
        batch = Batch()
        if auth_fields:
            batch.hset(f"auth:{event['user_id']}", auth_fields)
        batch.publish(channel, json.dumps(event))
        await backend.execute(batch)


@pytest.mark.parametrize(
    ("reason", "code"), [("logout", 4000), ("kicked", 4000), ("banned", 4403), ("revoked", 4401)]
)
async def test_logout_closes_the_user_on_every_instance(redis_server, nursery, reason, code):
    one = await start(nursery, make_config(redis_server.url, "inst-1"))
    two = await start(nursery, make_config(redis_server.url, "inst-2"))
    async with (
        open_client(one.url, make_token("alice")) as laptop,
        open_client(two.url, make_token("alice")) as phone,
        open_client(two.url, make_token("bob")) as bob,
    ):
        await _publish(redis_server.url, "auth:logout", {"user_id": "alice", "reason": reason})
        for chat in (laptop, phone):
            frames, close_code = await _closed_with(chat)
            assert (frames, close_code) == ([{"type": "logout", "reason": reason}], code)
        assert (await bob.ping())["type"] == "pong"


async def test_logout_of_one_session_only(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url))
    async with (
        open_client(server.url, make_token("alice")) as laptop,
        open_client(server.url, make_token("alice")) as phone,
    ):
        event = {"user_id": "alice", "session_id": phone.welcome["session_id"], "reason": "kicked"}
        await _publish(redis_server.url, "auth:logout", event)
        assert await _closed_with(phone) == ([{"type": "logout", "reason": "kicked"}], 4000)
        assert (await laptop.ping())["type"] == "pong"


async def test_ban_mute_and_not_before_apply_to_the_next_frame(redis_server, nursery):
    # a long cache: only the auth:changed event can make the change visible at once
    config = dict(auth={"cache_ttl": 60})
    one = await start(nursery, make_config(redis_server.url, "inst-1", **config))
    two = await start(nursery, make_config(redis_server.url, "inst-2", **config))
    async with (
        open_client(one.url, make_token("alice")) as laptop,
        open_client(two.url, make_token("alice")) as phone,
    ):
        for chat in (laptop, phone):
            await chat.join("room")
            await chat.send("room", "warm the cache")
        changed = {"user_id": "alice"}
        await _publish(redis_server.url, "auth:changed", changed, muted_until=str(2**31))
        for chat in (laptop, phone):
            with pytest.raises(ServerError) as info:
                await chat.send("room", "hello")
            assert info.value.code == "muted"
        await _publish(
            redis_server.url,
            "auth:changed",
            changed,
            muted_until="0",
            not_before=str(2**31),
        )
        for chat in (laptop, phone):
            await chat.send_frame({"type": "send", "room": "room", "data": 1})
            frames, code = await _closed_with(chat)
            assert (frames[-1], code) == ({"type": "logout", "reason": "revoked"}, 4401)


async def _hgetall_calls(redis_url: str) -> int:
    client = coredis.Redis.from_url(redis_url, decode_responses=True)
    async with client:
        stats = await client.info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def test_the_handshakes_read_of_auth_serves_the_first_join(redis_server, nursery):
    # one read of auth:<uid> per connection: the handshake's, kept for the join and the send
    server = await start(nursery, make_config(redis_server.url, auth={"cache_ttl": 60}))
    before = await _hgetall_calls(redis_server.url)
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("room")
        await chat.send("room", "hello")
    assert await _hgetall_calls(redis_server.url) == before + 1


async def test_a_change_announced_during_the_handshake_is_not_cached_over(
    redis_server, nursery, monkeypatch
):
    # A ban announced after the handshake read auth:alice must not hide behind that read.
    server = await start(nursery, make_config(redis_server.url, auth={"cache_ttl": 60}))
    remember = Hub.remember_auth

    async def announce_then_remember(self, user_id, record, stamp):
        self.forget_auth(user_id)  # what the pump does for auth:changed
        remember(self, user_id, record, stamp)

    monkeypatch.setattr(
        Hub, "remember_auth", lambda *a: nursery.start_soon(announce_then_remember, *a)
    )
    async with open_client(server.url, make_token("alice")) as chat:
        await _publish(redis_server.url, "auth:none", {"user_id": "alice"}, status="banned")
        await chat.send_frame({"type": "join", "room": "room"})
        frames, code = await _closed_with(chat)
        assert (frames[-1], code) == ({"type": "logout", "reason": "banned"}, 4403)


async def test_bare_hset_ban_applies_within_cache_ttl(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url, auth={"cache_ttl": 0.2}))
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("room")
        async with open_backend(redis_server.url, command_timeout=1) as backend:
            batch = Batch()
            batch.hset("auth:alice", {"status": "banned"})
            await backend.execute(batch)
        await trio.sleep(0.25)
        await chat.send_frame({"type": "send", "room": "room", "data": 1})
        frames, code = await _closed_with(chat)
        assert (frames[-1], code) == ({"type": "logout", "reason": "banned"}, 4403)


# --- token expiry -------------------------------------------------------------------------------

EXPIRY = dict(auth={"refresh_window": 1, "leeway": 0})


async def test_token_expiring_then_expired_without_refresh(nursery):
    server = await start(nursery, make_config(**EXPIRY))
    async with open_client(server.url, make_token("alice", ttl=2)) as chat:
        frames, code = await _closed_with(chat)
        expires_at = chat.welcome["expires_at"]
        assert frames == [
            {"type": "token_expiring", "expires_at": expires_at},
            {"type": "logout", "reason": "expired"},
        ]
        assert code == 4401


async def test_refresh_just_before_the_deadline_wins(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url, **EXPIRY))
    async with open_client(server.url, make_token("alice", ttl=2)) as chat:
        with trio.fail_after(3):
            assert (await chat.receive())["type"] == "token_expiring"
        fresh = make_token("alice", ttl=3600)
        reply = await chat.request("refresh", token=fresh)
        assert reply["type"] == "refreshed"
        assert reply["expires_at"] > chat.welcome["expires_at"] + 3000
        await trio.sleep(1.5)  # past the old token's deadline
        assert (await chat.ping())["type"] == "pong"
        async with open_backend(redis_server.url, command_timeout=1) as backend:
            batch = Batch()
            exp = batch.hget(f"ws:session:{chat.welcome['session_id']}", "token_exp")
            await backend.execute(batch)
        assert int(exp.value) == reply["expires_at"]


@pytest.mark.parametrize("case", ["other-sub", "expired", "garbage"])
async def test_refresh_refused_ends_the_session(nursery, case):
    server = await start(nursery, make_config(**EXPIRY))
    token = {
        "other-sub": make_token("mallory"),
        "expired": make_token("alice", ttl=-10),
        "garbage": "x.y.z",
    }[case]
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.send_frame({"type": "refresh", "token": token, "ref": 5})
        frames, code = await _closed_with(chat)
        assert frames[0]["type"] == "error"
        assert frames[0]["ref"] == 5
        assert (frames[-1], code) == ({"type": "logout", "reason": "expired"}, 4401)


# --- heartbeats -----------------------------------------------------------------------------------


async def test_heartbeat_keeps_the_session_past_three_ttls_and_rewrites_lost_records(
    redis_server, nursery
):
    config = make_config(redis_server.url, "inst-1", session={"ttl": 0.3, "instance_ttl": 0.3})
    server = await start(nursery, config)
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("room")
        sid = chat.welcome["session_id"]
        keys = [f"ws:session:{sid}", "ws:user:alice", "ws:room:room", "ws:instance:inst-1"]
        async with open_backend(redis_server.url, command_timeout=1) as backend:
            await trio.sleep(1.0)  # > 3 x ttl
            assert set((await snapshot(backend, *keys)).values()) == {1}
            redis_server.flushall()  # Redis lost everything (restart, eviction)
            await trio.sleep(0.3)
            assert set((await snapshot(backend, *keys)).values()) == {1}
            record = await _hash(backend, f"ws:session:{sid}")
            assert record["user_id"] == "alice"
            assert json.loads(record["rooms"]) == ["room"]


async def _hash(backend, key):
    batch = Batch()
    reply = batch.hgetall(key)
    await backend.execute(batch)
    return reply.value


async def test_unanswered_pings_close_4408(nursery):
    server = await start(
        nursery,
        make_config(heartbeat={"ping_interval": 0.1, "ping_timeout": 0.2}),
    )
    async with (
        open_client(server.url, make_token("talker")) as talker,
        open_client(server.url, make_token("stuck")) as stuck,
    ):
        await stuck.join("room")
        await talker.join("room")
        # trio-websocket's client answers pings from its reader task, which stops once its
        # one-message queue is full: fill it and the pings go unanswered.
        for n in range(3):
            await talker.send("room", n)
        await trio.sleep(1.0)
        _frames, code = await _closed_with(stuck)
        assert code == 4408
        assert (await talker.ping())["type"] == "pong"  # answered pings keep the talker


# --- limits ---------------------------------------------------------------------------------------


async def test_send_rate_limit_then_4429(nursery):
    server = await start(nursery, make_config(limits={"send_rate": 0.001, "send_burst": 2}))
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("room")
        await chat.send("room", 1)
        await chat.direct("bob", 2)
        with pytest.raises(ServerError) as info:
            await chat.send("room", 3)
        assert info.value.code == "rate_limited"
        for _ in range(20):
            await chat.send_frame({"type": "send", "room": "room", "data": 0})
        frames, code = await _closed_with(chat)
        assert code == 4429
        assert {f["code"] for f in frames} == {"rate_limited"}


async def test_every_frame_is_budgeted_then_4429(nursery):
    # join/leave churn (SUBSCRIBE/UNSUBSCRIBE on Redis) and pings spend the frame bucket
    limits = {"frame_rate": 0.001, "frame_burst": 3, "send_rate": 1000, "send_burst": 1000}
    server = await start(nursery, make_config(limits=limits))
    async with open_client(server.url, make_token("alice")) as chat:
        assert (await chat.join("room"))["type"] == "joined"
        assert (await chat.leave("room"))["type"] == "left"
        assert (await chat.ping())["type"] == "pong"
        with pytest.raises(ServerError) as info:
            await chat.join("room")
        assert (info.value.code, info.value.frame.get("ref")) == ("rate_limited", 4)
        for _ in range(20):
            await chat.send_frame({"type": "ping"})
        frames, code = await _closed_with(chat)
        assert code == 4429
        assert {f["code"] for f in frames} == {"rate_limited"}


async def test_the_frame_budget_refills(nursery):
    # a client that keeps to the rate is never refused, however long it goes on
    server = await start(nursery, make_config(limits={"frame_rate": 100, "frame_burst": 1}))
    async with open_client(server.url, make_token("alice")) as chat:
        for _ in range(30):
            assert (await chat.ping())["type"] == "pong"
            await trio.sleep(0.011)


async def test_frame_size_is_counted_in_bytes(nursery):
    # 40,000 two-byte characters: 80,000 bytes, over a 64 KiB limit that counts bytes
    server = await start(nursery, make_config())
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("room")
        frame = json.dumps(
            {"type": "send", "room": "room", "data": "é" * 40_000}, ensure_ascii=False
        )
        assert len(frame) < 65536 < len(frame.encode())
        await chat.ws.send_message(frame)
        frames, code = await _closed_with(chat)
        assert (frames, code) == ([], 1009)


async def test_a_frame_just_under_the_byte_limit_passes(nursery):
    limit = 4096
    server = await start(nursery, make_config(limits={"max_message_bytes": limit}))
    async with open_client(server.url, make_token("alice")) as chat:
        await chat.join("room")
        frame = '{"type":"ping","ref":"%s"}'
        padding = "é" * ((limit - len(frame % "")) // 2)
        assert len((frame % padding).encode()) <= limit
        await chat.ws.send_message(frame % padding)
        assert (await chat.receive())["type"] == "pong"
        await chat.ws.send_message(frame % (padding + "é"))
        assert (await _closed_with(chat))[1] == 1009


async def test_connection_and_room_limits(nursery):
    server = await start(
        nursery, make_config(limits={"max_connections": 1, "max_rooms_per_session": 1})
    )
    async with open_client(server.url, make_token("alice")) as chat:
        with pytest.raises(ConnectionRejected) as info:
            async with open_client(server.url, make_token("bob")):
                pass
        assert info.value.status_code == 429
        assert json.loads(info.value.body)["error"] == "too_many_connections"
        await chat.join("one")
        with pytest.raises(ServerError) as too_many:
            await chat.join("two")
        assert too_many.value.code == "forbidden"


# --- crashes, outages, shutdown -------------------------------------------------------------------


async def test_sigkill_instance_is_reaped_by_a_live_one(redis_or_cluster, nursery, tmp_path):
    short = {"TRIO_CHAT_SESSION_TTL": "30", "TRIO_CHAT_SESSION_INSTANCE_TTL": "0.5"}
    victim, url = await spawn(tmp_path / "victim.log", redis_or_cluster.url, "victim", **short)
    try:
        async with open_client(url, make_token("alice")) as chat:
            await chat.join("room")
            sid = chat.welcome["session_id"]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
    finally:
        victim.kill()
        victim.wait()
    await start(
        nursery, make_config(redis_or_cluster.url, "survivor", session={"instance_ttl": 0.5})
    )
    keys = [f"ws:session:{sid}", "ws:user:alice", "ws:instance:victim:sessions", "ws:room:room"]
    async with open_backend(redis_or_cluster.url, command_timeout=1) as backend:
        with trio.fail_after(5):
            while any((await snapshot(backend, *keys)).values()):
                await trio.sleep(0.05)
        batch = Batch()
        instances = batch.smembers("ws:instances")
        await backend.execute(batch)
    assert instances.value == {"survivor"}


async def test_a_redis_stall_longer_than_instance_ttl_reaps_no_live_instance(redis_server, nursery):
    # Every ws:instance key expires during the stall, the live ones' too; the heartbeats
    # write them back within a third of instance_ttl, before any cleaner may reap.
    short = {"session": {"ttl": 30, "instance_ttl": 0.4}, "redis": {"command_timeout": 0.3}}
    names = ["inst-1", "inst-2", "inst-3"]
    servers = [await start(nursery, make_config(redis_server.url, n, **short)) for n in names]
    async with (
        open_client(servers[1].url, make_token("alice")) as alice,
        open_client(servers[2].url, make_token("bob")) as bob,
    ):
        await alice.join("room")
        await bob.join("room")
        kept = [f"ws:session:{c.welcome['session_id']}" for c in (alice, bob)]
        kept += ["ws:user:alice", "ws:user:bob", "ws:room:room"]
        redis_server.pause()
        await trio.sleep(1.0)  # 2.5 x instance_ttl
        redis_server.resume()
        async with open_backend(redis_server.url, command_timeout=1) as backend:
            with trio.fail_after(5):
                for _ in range(40):  # 2 s: several sweeps of every cleaner
                    left = await snapshot(backend, *kept)
                    assert set(left.values()) == {1}, left
                    await trio.sleep(0.05)
            batch = Batch()
            instances = batch.smembers("ws:instances")
            await backend.execute(batch)
        assert instances.value == set(names)
        assert (await bob.send("room", "still here"))["type"] == "ack"
        assert (await alice.receive())["data"] == "still here"


async def test_sigterm_drains_with_1001_and_exit_0(redis_server, tmp_path):
    process, url = await spawn(tmp_path / "draining.log", redis_server.url, "draining")
    try:
        async with open_client(url, make_token("alice")) as chat:
            sid = chat.welcome["session_id"]
            process.send_signal(signal.SIGTERM)
            _frames, code = await _closed_with(chat)
            assert code == 1001
        with trio.fail_after(10):
            while process.poll() is None:
                await trio.sleep(0.05)
        assert process.returncode == 0
    finally:
        process.kill()
        process.wait()
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        left = await snapshot(backend, f"ws:session:{sid}", "ws:user:alice", "ws:instance:draining")
        assert set(left.values()) == {0}


async def test_redis_restart_recovers_fanout_and_records(redis_server, nursery):
    short = dict(session={"ttl": 0.6, "instance_ttl": 0.6})
    one = await start(nursery, make_config(redis_server.url, "inst-1", **short))
    two = await start(nursery, make_config(redis_server.url, "inst-2", **short))
    async with (
        open_client(one.url, make_token("alice")) as alice,
        open_client(two.url, make_token("bob")) as bob,
    ):
        await alice.join("room")
        await bob.join("room")
        redis_server.restart()  # killed, started again empty on the same port
        with trio.fail_after(10):
            while True:  # sends fail with `unavailable` until the store is back
                try:
                    await alice.send("room", "after")
                    break
                except ServerError as exc:
                    if exc.code != "unavailable":
                        raise
                    await trio.sleep(0.05)
            # the pump may still be resubscribing: keep sending until one gets through
            while True:
                with trio.move_on_after(0.3):
                    frame = await bob.receive()
                    assert frame["type"] == "message"
                    break
                await alice.send("room", "after")
        sids = [alice.welcome["session_id"], bob.welcome["session_id"]]
        async with open_backend(redis_server.url, command_timeout=1) as backend:
            with trio.fail_after(5):
                keys = [f"ws:session:{s}" for s in sids] + ["ws:instance:inst-1", "ws:room:room"]
                while not all((await snapshot(backend, *keys)).values()):
                    await trio.sleep(0.05)


# --- opaque sessions, the clean command, a stale pump, shutdown with Redis gone ----------------


async def test_opaque_session_id_is_resolved_and_revocable(redis_server, nursery):
    server = await start(
        nursery, make_config(redis_server.url, auth={"session_key": "session:<id>"})
    )
    opaque = "s3ss10n-1d-0123456789"
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        batch = Batch()
        batch.hset(f"session:{opaque}", {"user_id": "carol"})
        batch.expire(f"session:{opaque}", 600)
        await backend.execute(batch)
        async with open_client(
            server.url, headers=[("Cookie", f"trio_chat_token={opaque}")]
        ) as chat:
            assert chat.welcome["user_id"] == "carol"
            assert 0 < chat.welcome["expires_at"] - time.time() <= 601
            # revoke: delete the key, publish the logout
            batch = Batch()
            batch.delete(f"session:{opaque}")
            batch.publish("auth:logout", json.dumps({"user_id": "carol", "reason": "revoked"}))
            await backend.execute(batch)
            assert (await _closed_with(chat))[1] == 4401
    with pytest.raises(ConnectionRejected) as info:
        async with open_client(server.url, opaque):
            pass
    assert (info.value.status_code, json.loads(info.value.body)["error"]) == (
        401,
        "invalid_session",
    )


async def test_clean_command_reaps_dead_instances(redis_or_cluster):
    async with open_backend(redis_or_cluster.url, command_timeout=1) as backend:
        batch = Batch()
        batch.sadd("ws:instances", "dead-1")
        batch.hset("ws:instance:dead-1:sessions", {"sid-a": "alice", "sid-b": "bob"})
        # sid-b's ws:session has expired: its rooms are known from the instance's map only
        batch.hset("ws:instance:dead-1:rooms", {"sid-a": '["room"]', "sid-b": '["other","room"]'})
        batch.sadd("ws:user:alice", "sid-a", "sid-live")
        batch.hset("ws:session:sid-a", {"user_id": "alice", "rooms": '["room"]'})
        batch.zadd("ws:room:room", {"sid-a": 1.0, "sid-b": 1.0, "sid-c": 1.0})
        batch.zadd("ws:room:other", {"sid-b": 1.0})
        batch.hset("ws:room:room:users", {"alice": "1", "bob": "1", "carol": "1"})
        batch.hset("ws:room:other:users", {"bob": "1"})
        batch.zadd("ws:rooms", {"room": 3, "other": 1})
        await backend.execute(batch)
        result = await _clean(redis_or_cluster.url)
        assert result.returncode == 0
        assert result.stdout.strip() == b"reaped 1 dead instance(s): dead-1"
        batch = Batch()
        users = batch.smembers("ws:user:alice")
        instances = batch.smembers("ws:instances")
        room = batch.zrangebyscore("ws:room:room", 0, math.inf)
        counted = batch.hgetall("ws:room:room:users")
        index = batch.zrevrange("ws:rooms", 10)
        left = batch.exists(
            "ws:session:sid-a",
            "ws:instance:dead-1:sessions",
            "ws:instance:dead-1:rooms",
            "ws:room:other:users",
        )
        await backend.execute(batch)
        assert (users.value, instances.value, room.value, left.value) == (
            {"sid-live"},
            set(),
            ["sid-c"],
            0,
        )
        assert (counted.value, index.value) == ({"carol": "1"}, [("room", 1.0)])


async def test_clean_command_reports_unreachable_redis(redis_server):
    redis_server.kill()
    result = await _clean(redis_server.url)
    assert result.returncode == 1
    assert result.stderr.startswith(b"trio-chat: redis unreachable")
    assert b"Traceback" not in result.stderr


async def _clean(redis_url: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "trio_chat", "clean", "--redis-url", redis_url]
    with trio.fail_after(30):
        return await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )


async def test_sigterm_exits_0_within_the_timeout_while_redis_is_paused(redis_server, tmp_path):
    process, url = await spawn(
        tmp_path / "paused.log",
        redis_server.url,
        "paused",
        TRIO_CHAT_SERVER_SHUTDOWN_TIMEOUT="3",
        TRIO_CHAT_REDIS_COMMAND_TIMEOUT="0.3",
    )
    try:
        async with open_client(url, make_token("alice")) as chat:
            await chat.join("room")
            redis_server.pause()
            try:
                started = trio.current_time()
                process.send_signal(signal.SIGTERM)
                assert (await _closed_with(chat))[1] == 1001
                with trio.fail_after(6):
                    while process.poll() is None:
                        await trio.sleep(0.05)
                assert process.returncode == 0
                assert trio.current_time() - started < 3.5
            finally:
                redis_server.resume()
    finally:
        process.kill()
        process.wait()


class _DeafBackend:
    """Wraps a backend so that its first subscription stays connected but hears nothing."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.url = inner.url
        self.opened = 0

    async def execute(self, batch) -> None:
        await self.inner.execute(batch)

    @asynccontextmanager
    async def subscription(self):
        self.opened += 1
        async with self.inner.subscription() as subscription:
            yield _Deaf(subscription) if self.opened == 1 else subscription


class _Deaf:
    def __init__(self, inner) -> None:
        self.inner = inner

    async def subscribe(self, *channels: str) -> None:
        await self.inner.subscribe(*channels)

    async def unsubscribe(self, *channels: str) -> None:
        await self.inner.unsubscribe(*channels)

    def messages(self):
        return self

    def __aiter__(self):
        return self

    async def __anext__(self):
        await trio.sleep_forever()


async def test_a_stale_pump_is_logged_and_reconnected(nursery, caplog):
    config = make_config(session={"instance_ttl": 0.3}, redis={"command_timeout": 0.1})
    async with open_backend("memory://", command_timeout=1) as memory:
        backend = _DeafBackend(memory)
        hub = Hub(config, backend)
        await nursery.start(hub.run)
        with trio.fail_after(5):
            while backend.opened < 2:
                await trio.sleep(0.01)
        assert hub.reconnects == 1
        assert "Pub/Sub pump is stale" in caplog.text
        await trio.sleep(0.5)  # probes on the new connection come back
        assert hub.pump_healthy
        assert hub.reconnects == 1


async def test_the_cleaner_reaps_only_an_instance_missing_for_the_whole_grace(autojump_clock):
    # the rule behind the stall test above, step by step on the memory store
    async with open_backend("memory://", command_timeout=1) as backend:
        batch = Batch()
        batch.sadd("ws:instances", "me", "stalled", "dead")
        batch.hset("ws:instance:dead:sessions", {"s1": "alice"})
        batch.sadd("ws:user:alice", "s1")
        await backend.execute(batch)
        suspects: dict[str, float] = {}
        assert await sweep(backend, "me", Config(), suspects=suspects, grace=1.0) == []
        assert set(suspects) == {"stalled", "dead"}
        batch = Batch()
        batch.hset("ws:instance:stalled", {"host": "h"})  # its heartbeat wrote it back
        await backend.execute(batch)
        await trio.sleep(1.0)
        assert await sweep(backend, "me", Config(), suspects=suspects, grace=1.0) == ["dead"]
        assert set(suspects) == {"dead"}  # (the next sweep sees it gone from ws:instances)
        assert (await snapshot(backend, "ws:user:alice"))["ws:user:alice"] == 0
        # without a memory (trio-chat clean), a missing key is reaped at once
        batch = Batch()
        batch.delete("ws:instance:stalled")
        await backend.execute(batch)
        assert await sweep(backend, "me", Config()) == ["stalled"]
