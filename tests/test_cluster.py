"""The Redis Cluster backend (SPEC §12) on a real cluster of redis-server processes.

The store contract suite runs on the cluster too (``backend_url``'s ``cluster`` variant, in
test_store.py), and so do the admin API, reaping and ``trio-chat clean`` tests
(``redis_or_cluster``); here are what only a cluster has: batches split over the masters, shard
channels, redirections, slots moving under a subscription, a master failing over, and two
trio-chat instances on one cluster. Tests taking ``redis_cluster_module`` leave the shared
cluster as they found it; those that kill nodes or move slots take a cluster of their own.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest
import trio
from _chat import ADMIN, admin_client, make_config, make_token, start
from _redis_cluster import NODE_TIMEOUT_MS, command

from trio_chat._errors import BackendUnavailable, ConfigError
from trio_chat._store.backends import open_backend
from trio_chat._store.cluster import ClusterBackend, ClusterURL
from trio_chat._store.interface import Batch
from trio_chat._store.keys import hash_slot
from trio_chat.client import ServerError, open_client

if TYPE_CHECKING:
    from _redis_cluster import RedisCluster

    from trio_chat.client import ChatClient

TIME_LIMIT = 10  # seconds, for a test that does not wait for a failover
#: a failover takes 2-3 s at a 1 s node timeout; this only keeps a broken cluster from hanging
FAILOVER_LIMIT = NODE_TIMEOUT_MS / 1000 * 20


def rooms_on(cluster: RedisCluster, per_master: int) -> dict[int, list[str]]:
    """``per_master`` room ids whose channel each master owns."""
    rooms: dict[int, list[str]] = {port: [] for port in cluster.masters()}
    n = 0
    while any(len(found) < per_master for found in rooms.values()):
        room = f"r{n}"
        owner = cluster.slot_owner[cluster.keyslot(f"chat:room:{room}")]
        if len(rooms[owner]) < per_master:
            rooms[owner].append(room)
        n += 1
    return rooms


async def until_ok(call: Any, *args: Any, limit: float = FAILOVER_LIMIT) -> tuple[Any, float]:
    """Call until it does not raise BackendUnavailable; return its result and the time taken."""
    started = trio.current_time()
    with trio.fail_after(limit):
        while True:
            try:
                return await call(*args), trio.current_time() - started
            except BackendUnavailable:
                await trio.sleep(0.02)


async def take(subscription: Any, count: int) -> list[tuple[str, str]]:
    received = []
    async for message in subscription.messages():
        received.append(message)
        if len(received) == count:
            break
    return received


# --- the backend ------------------------------------------------------------------------------


def test_hash_slot_is_the_clusters(redis_cluster_module: RedisCluster) -> None:
    names = ["", "a", "chat:room:lobby", "ws:user:{alice}", "{}x", "{a}{b}", "ünïcode", "x" * 300]
    assert [hash_slot(name) for name in names] == [
        redis_cluster_module.keyslot(name) for name in names
    ]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://", "at least one host:port"),
        ("redis+cluster://127.0.0.1", "is not host:port"),
        ("redis+cluster://h:1,h:x", "'h:x' is not host:port"),
        ("redis+cluster://h:1/3", "only database 0"),
    ],
)
def test_a_bad_cluster_url_is_a_config_error(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterURL.parse(url)


def test_node_urls_keep_the_credentials_and_options() -> None:
    parsed = ClusterURL.parse("rediss+cluster://u:p%40ss@h1:7000,[::1]:7001?ssl_cert_reqs=none")
    assert parsed.seeds == ["h1:7000", "[::1]:7001"]
    assert parsed.node("10.0.0.9:7002") == "rediss://u:p%40ss@10.0.0.9:7002?ssl_cert_reqs=none"


async def test_no_seed_answering_is_unavailable() -> None:
    with trio.fail_after(TIME_LIMIT), pytest.raises(BackendUnavailable, match="CLUSTER SHARDS"):
        async with open_backend("redis+cluster://127.0.0.1:1", command_timeout=0.5):
            pass


async def test_a_batch_is_split_over_the_masters(redis_cluster_module: RedisCluster) -> None:
    cluster = redis_cluster_module
    mine = {port: cluster.key_for_master(port, "split") for port in cluster.masters()}
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(cluster.url, command_timeout=1) as backend:
            batch = Batch()
            written = [batch.set(key, str(port)) for port, key in mine.items()]
            counted = batch.exists(*mine.values(), "split:none")
            await backend.execute(batch)
            assert [reply.value for reply in written] == [True] * 3
            assert counted.value == 3
            # each key is on the master owning its slot
            for port, key in mine.items():
                assert command(port, "GET", key) == str(port)
            batch = Batch()
            deleted = batch.delete(*mine.values())
            await backend.execute(batch)
            assert deleted.value == 3
            assert isinstance(backend, ClusterBackend)
            assert backend.redirections == 0


async def test_room_and_control_channels_are_shard_channels(
    redis_cluster_module: RedisCluster,
) -> None:
    cluster = redis_cluster_module
    rooms = rooms_on(cluster, 2)
    channels = [f"chat:room:{room}" for found in rooms.values() for room in found]
    home = cluster.master_for_key("auth:logout")
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_backend(cluster.url, command_timeout=1) as backend,
            backend.subscription() as subscription,
        ):
            await subscription.subscribe("auth:logout", "ws:control:i1", *channels)
            for port, found in rooms.items():
                shard = command(port, "PUBSUB", "SHARDNUMSUB", *(f"chat:room:{r}" for r in found))
                assert shard[1::2] == [1, 1], (port, shard)
                # a shard channel is nothing to classic Pub/Sub, on its master or another
                assert command(port, "PUBSUB", "NUMSUB", f"chat:room:{found[0]}")[1] == 0
            assert command(home, "PUBSUB", "NUMSUB", "auth:logout") == ["auth:logout", 1]
            control = cluster.master_for_key("ws:control:i1")
            assert command(control, "PUBSUB", "SHARDNUMSUB", "ws:control:i1")[1] == 1

            batch = Batch()
            counts = [batch.publish(channel, channel) for channel in channels]
            logout = batch.publish("auth:logout", "bye")  # counted as on one Redis
            await backend.execute(batch)
            assert [count.value for count in counts] == [1] * len(channels)
            assert logout.value == 1
            received = await take(subscription, len(channels) + 1)
            assert sorted(received) == sorted([(c, c) for c in channels] + [("auth:logout", "bye")])
            # rooms on every master, one ordered stream per room
            await subscription.unsubscribe(*channels)
            for port, found in rooms.items():
                shard = command(port, "PUBSUB", "SHARDNUMSUB", *(f"chat:room:{r}" for r in found))
                assert shard[1::2] == [0, 0]


async def test_a_moved_slot_is_followed_and_ends_the_subscription_on_it(
    redis_cluster: RedisCluster,
) -> None:
    cluster = redis_cluster
    channel = "chat:room:moving"
    slot = cluster.keyslot(channel)
    source = cluster.slot_owner[slot]
    target = next(port for port in cluster.masters() if port != source)
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(cluster.url, command_timeout=1) as backend:
            assert isinstance(backend, ClusterBackend)
            batch = Batch()
            first = batch.append(channel, '{"n":1}', maxlen=10, ttl=60)
            await backend.execute(batch)
            async with backend.subscription() as subscription:
                await subscription.subscribe(channel)
                await trio.to_thread.run_sync(cluster.migrate_slot, slot, target)
                # Redis unsubscribes a shard channel whose slot moves: the subscription is lost
                with pytest.raises(BackendUnavailable, match="slot moved"):
                    await take(subscription, 1)
            # the backend still has the old map: the node answers MOVED and it follows
            batch = Batch()
            second = batch.append(channel, '{"n":2}', maxlen=10, ttl=60)
            await backend.execute(batch)
            assert backend.redirections == 1
            batch = Batch()  # (a stream is read in a later batch than its appends)
            entries = batch.xrange(channel, "-", "+", 10)
            await backend.execute(batch)
            assert [entry_id for entry_id, _ in entries.value] == [first.value, second.value]
            assert command(target, "XLEN", channel) == 2
            # a new subscription finds the slot's new master
            with trio.fail_after(TIME_LIMIT):
                while backend.map_reads < 2:
                    await trio.sleep(0.01)
            async with backend.subscription() as subscription:
                await subscription.subscribe(channel)
                assert command(target, "PUBSUB", "SHARDNUMSUB", channel)[1] == 1
                batch = Batch()
                batch.publish(channel, "after")
                await backend.execute(batch)
                assert await take(subscription, 1) == [(channel, "after")]


async def test_a_failed_master_fails_its_share_until_its_replica_takes_over(
    redis_cluster: RedisCluster,
) -> None:
    cluster = redis_cluster
    victim = cluster.master_for_key("chat:room:doomed")
    (replica,) = cluster.shards[victim]
    elsewhere = next(cluster.key_for_master(p, "alive") for p in cluster.masters() if p != victim)

    async def append(key: str) -> str:
        batch = Batch()
        appended = batch.append(key, '{"n":1}', maxlen=10, ttl=60)
        await backend.execute(batch)
        return appended.value

    async with open_backend(cluster.url, command_timeout=0.5) as backend:
        with trio.fail_after(TIME_LIMIT):
            await append("chat:room:doomed")  # the script is loaded on the victim only
            async with backend.subscription() as subscription:
                await subscription.subscribe("chat:room:doomed")
                cluster.kill(victim)
                with pytest.raises(BackendUnavailable):
                    await take(subscription, 1)
            with pytest.raises(BackendUnavailable) as refused:
                await append("chat:room:doomed")
            assert not refused.value.sent  # the connection was refused: nothing ran
            # the other masters' shares go on meanwhile
            await append(f"chat:room:{elsewhere}")
        # once the replica is promoted (the map is read again in the background), it takes
        # the victim's slots, and loads the script it never had
        _, took = await until_ok(append, "chat:room:doomed")
        print(f"\nappends to the failed master's slot resumed after {took:.2f} s")
        assert cluster.master_for_key("chat:room:doomed") == replica
        with trio.fail_after(TIME_LIMIT):
            async with backend.subscription() as subscription:
                await subscription.subscribe("chat:room:doomed")
                batch = Batch()
                batch.publish("chat:room:doomed", "back")
                await backend.execute(batch)
                assert await take(subscription, 1) == [("chat:room:doomed", "back")]


# --- trio-chat instances on a cluster ---------------------------------------------------------


async def receive_message(chat: ChatClient) -> dict[str, Any]:
    while (frame := await chat.receive())["type"] != "message":
        pass
    return frame


async def test_two_instances_fan_out_route_directs_and_log_out_across_the_cluster(
    redis_cluster_module: RedisCluster, nursery: trio.Nursery
) -> None:
    cluster = redis_cluster_module
    one = await start(nursery, make_config(cluster.url, "c-1"))
    two = await start(nursery, make_config(cluster.url, "c-2"))
    rooms = rooms_on(cluster, 4)
    every_room = [room for found in rooms.values() for room in found]
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(one.url, make_token("alice")) as alice,
            open_client(two.url, make_token("bob")) as bob,
        ):
            for room in every_room:
                await alice.join(room)
                await bob.join(room)
            # both instances hold every room's shard channel, on the room's own master
            for port, found in rooms.items():
                shard = command(port, "PUBSUB", "SHARDNUMSUB", *(f"chat:room:{r}" for r in found))
                assert shard[1::2] == [2] * len(found), (port, shard)
            for room in every_room:
                ack = await alice.send(room, {"in": room})
                message = await receive_message(bob)
                assert (message["room"], message["id"], message["data"]) == (
                    room,
                    ack["id"],
                    {"in": room},
                )
            # a direct message goes only to the instance holding bob: its control channel
            await alice.direct("bob", "psst")
            while (frame := await bob.receive())["type"] != "direct":
                pass
            assert (frame["from"], frame["data"]) == ("alice", "psst")
            # logout on the classic channel reaches every instance
            async with open_backend(cluster.url, command_timeout=1) as backend:
                batch = Batch()
                heard = batch.publish("auth:logout", json.dumps({"user_id": "bob"}))
                await backend.execute(batch)
                assert heard.value == 2  # both instances, as on one Redis
            frames = []
            with pytest.raises(Exception, match="4000"):
                while True:
                    frames.append(await bob.receive())
            assert frames[-1] == {"type": "logout", "reason": "logout"}
            assert (await alice.ping())["type"] == "pong"


async def test_history_recovery_on_the_cluster(
    redis_cluster_module: RedisCluster, nursery: trio.Nursery
) -> None:
    cluster = redis_cluster_module
    one = await start(nursery, make_config(cluster.url, "h-1"))
    two = await start(nursery, make_config(cluster.url, "h-2"))
    with trio.fail_after(TIME_LIMIT):
        async with open_client(one.url, make_token("alice")) as alice:
            await alice.join("recovering")
            async with open_client(two.url, make_token("bob")) as bob:
                await bob.join("recovering")
                seen = await alice.send("recovering", 0)
                assert (await receive_message(bob))["id"] == seen["id"]
            acked = [(await alice.send("recovering", n))["id"] for n in range(1, 6)]
            async with open_client(two.url, make_token("bob")) as bob:
                joined = await bob.request("join", room="recovering", since=seen["id"])
                assert (joined["recovered"], joined["missed"]) == (True, 5)
                assert [(await receive_message(bob))["id"] for _ in acked] == acked


async def test_a_failover_keeps_the_sockets_and_fan_out_comes_back_on_them(
    redis_cluster: RedisCluster, nursery: trio.Nursery
) -> None:
    cluster = redis_cluster
    room = "failing"
    victim = cluster.master_for_key(f"chat:room:{room}")
    one = await start(nursery, make_config(cluster.url, "f-1", admin=ADMIN))
    two = await start(nursery, make_config(cluster.url, "f-2"))
    async with (
        open_client(one.url, make_token("alice")) as alice,
        open_client(two.url, make_token("bob")) as bob,
        admin_client(one) as admin,
    ):
        with trio.fail_after(TIME_LIMIT):
            await alice.join(room)
            await bob.join(room)
            before = [(await alice.send(room, n))["id"] for n in range(5)]
            assert [(await receive_message(bob))["id"] for _ in before] == before
            ready = await admin.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["cluster"] == {
                "state": "ok",
                "masters": 3,
                "known_nodes": 6,
                "slots_ok": 16384,
            }

        killed = time.monotonic()
        cluster.kill(victim)
        refusals: list[str] = []
        not_ready = set()
        with trio.fail_after(FAILOVER_LIMIT):
            while True:  # sends in the meantime are refused, never acked and dropped
                try:
                    reply = await alice.send(room, "after")
                    break
                except ServerError as refusal:
                    refusals.append(refusal.code)
                if (ready := await admin.get("/readyz")).status_code == 503:
                    not_ready.update(ready.json()["reasons"])
                await trio.sleep(0.05)
            message = await receive_message(bob)
        took = time.monotonic() - killed
        print(f"\nfailover: first delivery {took:.2f} s after SIGKILL; {len(refusals)} refused")
        assert set(refusals) <= {"unavailable"}
        assert message["id"] == reply["id"]  # on the very sockets opened before
        assert not_ready & {"redis_unreachable", "cluster_not_ok", "pubsub_stale"}
        with trio.fail_after(FAILOVER_LIMIT):
            while (ready := await admin.get("/readyz")).status_code != 200:
                await trio.sleep(0.05)
        assert ready.json()["cluster"]["state"] == "ok"
        # the pump reconnected, and the backend read the slot map again (not only at start)
        scraped = (await admin.get("/metrics")).text
        counters = dict(
            line.split() for line in scraped.splitlines() if line.startswith("trio_chat_redis_")
        )
        assert float(counters["trio_chat_redis_reconnects_total"]) >= 1
        assert float(counters["trio_chat_redis_cluster_map_reads_total"]) >= 2
        with trio.fail_after(TIME_LIMIT):
            later = [(await alice.send(room, n))["id"] for n in range(5)]
            assert [(await receive_message(bob))["id"] for _ in later] == later
            joined = await bob.request("join", room=room, since=before[-1])
            assert (joined["recovered"], joined["missed"]) == (True, 6)
            replayed = [(await receive_message(bob))["id"] for _ in range(6)]
            assert replayed == [reply["id"], *later]


async def test_a_stalled_master_replaced_loses_the_subscription_while_it_sleeps(
    redis_cluster: RedisCluster,
) -> None:
    # SIGSTOP leaves the connections to the master open and silent: only the slot map, read
    # again once batches to it fail, tells that its replica took over
    cluster = redis_cluster
    victim = cluster.master_for_key("chat:room:stalled")
    (replica,) = cluster.shards[victim]
    async with open_backend(cluster.url, command_timeout=0.3) as backend:
        async with backend.subscription() as subscription:
            await subscription.subscribe("chat:room:stalled")
            cluster.pause(victim)
            try:

                async def write() -> None:
                    batch = Batch()
                    batch.set("chat:room:stalled:probe", "x")
                    await backend.execute(batch)

                _, took = await until_ok(write)
                with trio.fail_after(TIME_LIMIT), pytest.raises(BackendUnavailable) as lost:
                    await take(subscription, 1)
                assert "no longer a master" in str(lost.value.__cause__)
                print(f"\nwrites resumed {took:.2f} s after the SIGSTOP, on the replica")
            finally:
                cluster.resume(victim)
        await trio.to_thread.run_sync(cluster.wait_ok, 30.0)
    assert cluster.master_for_key("chat:room:stalled") == replica
