"""The store contract: the memory and Redis backends answer every Batch command alike.

Tests taking ``backend`` run on both; tests taking ``redis_server`` kill, pause and restart a
real redis-server of their own.
"""

from __future__ import annotations

import math
import re
import socket
from functools import partial

import pytest
import trio
from coredis.exceptions import WrongTypeError

from trio_chat._errors import BackendUnavailable, ConfigError
from trio_chat._store.backends import open_backend
from trio_chat._store.interface import Batch
from trio_chat._store.memory import MemoryBackend
from trio_chat._store.redis import RedisBackend, open_redis_backend
from trio_chat._store.resp import pack

TIME_LIMIT = 5  # seconds, for any one test


async def take(subscription, count):
    received = []
    async for message in subscription.messages():
        received.append(message)
        if len(received) == count:
            return received
    raise AssertionError(f"messages() ended after {received}")


async def read(backend, key="key"):
    batch = Batch()
    value = batch.get(key)
    await backend.execute(batch)
    return value.value


async def write(backend, value, key="key"):
    batch = Batch()
    batch.set(key, value)
    await backend.execute(batch)


async def fail_inside(context):
    async with context:
        raise LookupError("mine")


async def open_and_close(context):
    async with context:
        pass


# --- keys and values, on both backends


async def test_strings(backend):
    with trio.fail_after(TIME_LIMIT):
        batch = Batch()
        missing = batch.get("s")
        first = batch.set("s", "v1")
        taken = batch.set("s", "v2", nx=True)
        value = batch.get("s")
        fresh = batch.set("n", "x", nx=True)
        await backend.execute(batch)
        assert missing.value is None
        assert first.value is True
        assert taken.value is False
        assert value.value == "v1"
        assert fresh.value is True


async def test_delete_and_exists_count_like_redis(backend):
    with trio.fail_after(TIME_LIMIT):
        batch = Batch()
        batch.set("a", "1")
        batch.sadd("b", "m")
        mentions = batch.exists("a", "b", "a", "nope")  # a key counts once per mention
        deleted = batch.delete("a", "a", "nope")  # ... but is deleted once
        left = batch.exists("a", "b")
        await backend.execute(batch)
        assert (mentions.value, deleted.value, left.value) == (3, 1, 1)
        assert type(mentions.value) is int


async def test_expire_and_ttl(backend):
    with trio.fail_after(TIME_LIMIT):
        batch = Batch()
        batch.set("plain", "v")
        batch.set("short", "v", ex=0.1)
        batch.hset("hash", {"f": "v"})
        on_missing = batch.expire("nope", 10)
        on_hash = batch.expire("hash", 10)
        ttls = [batch.ttl(key) for key in ("nope", "plain", "hash", "short")]
        await backend.execute(batch)
        assert on_missing.value is False
        assert on_hash.value is True
        missing, plain, hashed, short = (ttl.value for ttl in ttls)
        assert missing is None
        assert plain is None
        assert isinstance(hashed, float)
        assert 9 < hashed <= 10
        assert 0 < short <= 0.1

        await trio.sleep(0.15)
        batch = Batch()
        value = batch.get("short")
        exists = batch.exists("short", "plain")
        ttl = batch.ttl("short")
        await backend.execute(batch)
        assert value.value is None
        assert exists.value == 1
        assert ttl.value is None


async def test_set_drops_the_ttl_and_hset_keeps_it(backend):
    with trio.fail_after(TIME_LIMIT):
        batch = Batch()
        batch.set("s", "v", ex=10)
        batch.set("s", "w")
        batch.hset("h", {"a": "1"})
        batch.expire("h", 10)
        batch.hset("h", {"b": "2"})
        string_ttl = batch.ttl("s")
        hash_ttl = batch.ttl("h")
        await backend.execute(batch)
        assert string_ttl.value is None
        assert 9 < hash_ttl.value <= 10


async def test_hashes(backend):
    with trio.fail_after(TIME_LIMIT):
        batch = Batch()
        added = batch.hset("h", {"a": "1", "b": "2"})
        updated = batch.hset("h", {"b": "3", "c": "4"})
        field = batch.hget("h", "b")
        no_field = batch.hget("h", "zz")
        no_hash = batch.hget("nope", "a")
        everything = batch.hgetall("h")
        nothing = batch.hgetall("nope")
        size = batch.hlen("h")
        removed = batch.hdel("h", "a", "a", "zz")
        rest = batch.hgetall("h")
        no_size = batch.hlen("nope")
        await backend.execute(batch)
        assert (size.value, no_size.value) == (3, 0)
        assert (added.value, updated.value) == (2, 1)
        assert field.value == "3"
        assert no_field.value is None
        assert no_hash.value is None
        assert everything.value == {"a": "1", "b": "3", "c": "4"}
        assert type(everything.value) is dict
        assert nothing.value == {}
        assert removed.value == 1
        assert rest.value == {"b": "3", "c": "4"}


async def test_sets(backend):
    with trio.fail_after(TIME_LIMIT):
        batch = Batch()
        added = batch.sadd("s", "a", "a", "b")
        again = batch.sadd("s", "b", "c")
        members = batch.smembers("s")
        size = batch.scard("s")
        removed = batch.srem("s", "a", "zz")
        nothing = batch.smembers("nope")
        no_size = batch.scard("nope")
        await backend.execute(batch)
        assert (added.value, again.value) == (2, 1)
        assert members.value == {"a", "b", "c"}
        assert type(members.value) is set
        assert size.value == 3
        assert removed.value == 1
        assert nothing.value == set()
        assert no_size.value == 0


async def test_sorted_sets(backend):
    with trio.fail_after(TIME_LIMIT):
        batch = Batch()
        added = batch.zadd("z", {"x": 2, "b": 2, "c": 1, "d": 5.5})
        updated = batch.zadd("z", {"a": 3, "d": 0.5})  # d moves
        everything = batch.zrangebyscore("z", -math.inf, math.inf)
        middle = batch.zrangebyscore("z", 2, 3)  # inclusive; equal scores by member
        trimmed = batch.zremrangebyscore("z", -math.inf, 1)
        removed = batch.zrem("z", "a", "zz")
        size = batch.zcard("z")
        rest = batch.zrangebyscore("z", 0, 10)
        nothing = batch.zrangebyscore("nope", 0, 10)
        await backend.execute(batch)
        assert (added.value, updated.value) == (4, 1)
        assert everything.value == ["d", "c", "b", "x", "a"]
        assert type(everything.value) is list
        assert middle.value == ["b", "x", "a"]
        assert trimmed.value == 2
        assert removed.value == 1
        assert size.value == 2
        assert rest.value == ["b", "x"]
        assert nothing.value == []


async def test_an_emptied_key_disappears_with_its_ttl(backend):
    with trio.fail_after(TIME_LIMIT):
        batch = Batch()
        batch.hset("h", {"f": "v"})
        batch.sadd("s", "m")
        batch.zadd("z", {"m": 1})
        for key in ("h", "s", "z"):
            batch.expire(key, 60)
        batch.hdel("h", "f")
        batch.srem("s", "m")
        batch.zremrangebyscore("z", 0, 1)
        gone = batch.exists("h", "s", "z")
        batch.hset("h", {"f": "v"})
        batch.sadd("s", "m")
        batch.zadd("z", {"m": 1})
        ttls = [batch.ttl(key) for key in ("h", "s", "z")]
        await backend.execute(batch)
        assert gone.value == 0
        assert [ttl.value for ttl in ttls] == [None, None, None]


async def test_nothing_to_act_on_answers_zero(backend):
    with trio.fail_after(TIME_LIMIT):
        batch = Batch()
        replies = [
            batch.delete(),
            batch.exists(),
            batch.hset("k", {}),
            batch.hdel("k"),
            batch.sadd("k"),
            batch.srem("k"),
            batch.zadd("k", {}),
            batch.zrem("k"),
            batch.exists("k"),
        ]
        await backend.execute(batch)
        assert [reply.value for reply in replies] == [0] * len(replies)


async def test_wrong_type_raises(backend):
    with trio.fail_after(TIME_LIMIT):
        await write(backend, "v", key="s")
        batch = Batch()
        batch.sadd("s", "m")
        with pytest.raises((TypeError, WrongTypeError), match="wrong kind of value"):
            await backend.execute(batch)


async def test_concurrent_batches_get_their_own_replies_and_errors(backend):
    # the Redis backend sends concurrent batches in one pipeline: a reply or an error must
    # still reach the batch whose command it answers, and only that batch
    results = {}

    async def one(n):
        batch = Batch()
        batch.set(f"k{n}", f"v{n}")
        value = batch.get(f"k{n}")
        if n % 7 == 3:
            batch.sadd("string", "m")  # WRONGTYPE
        try:
            await backend.execute(batch)
        except (TypeError, WrongTypeError):
            results[n] = "wrong type"
        else:
            results[n] = value.value

    with trio.fail_after(TIME_LIMIT):
        await write(backend, "v", key="string")
        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(one, n)
    assert results == {n: "wrong type" if n % 7 == 3 else f"v{n}" for n in range(40)}


async def test_errors_raised_inside_are_not_wrapped(backend):
    with trio.fail_after(TIME_LIMIT):
        with pytest.raises(LookupError, match="mine"):
            await fail_inside(backend.subscription())


# --- Pub/Sub, on both backends


async def test_published_messages_arrive_in_order(backend):
    with trio.fail_after(TIME_LIMIT):
        async with backend.subscription() as subscription:
            await subscription.subscribe("chat:a")
            batch = Batch()
            counts = [batch.publish("chat:a", str(n)) for n in range(5)]
            elsewhere = batch.publish("chat:b", "x")
            await backend.execute(batch)
            assert [count.value for count in counts] == [1] * 5
            assert elsewhere.value == 0
            assert await take(subscription, 5) == [("chat:a", str(n)) for n in range(5)]


async def test_every_subscription_receives_and_is_counted(backend):
    with trio.fail_after(TIME_LIMIT):
        async with backend.subscription() as one, backend.subscription() as two:
            await one.subscribe("c")
            await two.subscribe("c", "d")
            batch = Batch()
            to_both = batch.publish("c", "x")
            to_two = batch.publish("d", "y")
            await backend.execute(batch)
            assert (to_both.value, to_two.value) == (2, 1)
            assert await take(one, 1) == [("c", "x")]
            assert await take(two, 2) == [("c", "x"), ("d", "y")]


async def test_unsubscribe_stops_delivery(backend):
    with trio.fail_after(TIME_LIMIT):
        async with backend.subscription() as subscription:
            await subscription.subscribe("a", "b")
            await subscription.unsubscribe("a")
            await subscription.unsubscribe()  # no channel: nothing changes
            batch = Batch()
            to_a = batch.publish("a", "1")
            to_b = batch.publish("b", "2")
            await backend.execute(batch)
            assert (to_a.value, to_b.value) == (0, 1)
            assert await take(subscription, 1) == [("b", "2")]
        batch = Batch()
        after_close = batch.publish("b", "3")
        await backend.execute(batch)
        assert after_close.value == 0


# --- streams and the history script, on both backends


def append(batch, key, n, *, maxlen=100, ttl=60.0):
    return batch.append(key, f'{{"n":{n}}}', maxlen=maxlen, ttl=ttl)


async def test_append_adds_expires_and_publishes_with_the_entry_id(backend):
    with trio.fail_after(TIME_LIMIT):
        async with backend.subscription() as subscription:
            await subscription.subscribe("chat:room:r")
            batch = Batch()
            ids = [append(batch, "chat:room:r", n, ttl=30) for n in range(3)]
            await backend.execute(batch)
            batch = Batch()
            ttl = batch.ttl("chat:room:r")
            entries = batch.xrange("chat:room:r", "-", "+", 10)
            await backend.execute(batch)
            ids = [reply.value for reply in ids]
            assert all(re.fullmatch(r"\d+-\d+", i) for i in ids)
            assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
            assert len(set(ids)) == 3
            assert 29 < ttl.value <= 30
            assert entries.value == [(i, {"m": f'{{"n":{n}}}'}) for n, i in enumerate(ids)]
            published = await take(subscription, 3)
            assert published == [
                ("chat:room:r", f'{{"id":"{i}","n":{n}}}') for n, i in enumerate(ids)
            ]


async def test_ranges_both_ways_with_exclusive_bounds_and_counts(backend):
    batch = Batch()
    ids = [append(batch, "s", n) for n in range(5)]
    await backend.execute(batch)
    ids = [reply.value for reply in ids]
    batch = Batch()
    everything = batch.xrange("s", "-", "+", 100)
    after_second = batch.xrange("s", f"({ids[1]}", "+", 100)
    from_second = batch.xrange("s", ids[1], ids[3], 100)
    newest_two = batch.xrevrange("s", "+", "-", 2)
    before_fourth = batch.xrevrange("s", f"({ids[3]}", "-", 100)
    above_last = batch.xrange("s", f"({ids[4]}", "+", 100)
    missing = batch.xrange("nothing", "-", "+", 100)
    await backend.execute(batch)

    def ids_of(reply):
        return [entry_id for entry_id, _ in reply.value]

    assert ids_of(everything) == ids
    assert ids_of(after_second) == ids[2:]
    assert ids_of(from_second) == ids[1:4]
    assert ids_of(newest_two) == [ids[4], ids[3]]
    assert ids_of(before_fourth) == [ids[2], ids[1], ids[0]]
    assert (above_last.value, missing.value) == ([], [])


async def test_append_trims_the_oldest_entries(backend):
    # MAXLEN ~ trims whole blocks of entries in Redis: it keeps at least maxlen, and the
    # oldest go first; memory trims exactly
    batch = Batch()
    ids = [append(batch, "s", n, maxlen=10) for n in range(250)]
    await backend.execute(batch)
    batch = Batch()
    kept = batch.xrange("s", "-", "+", 1000)
    await backend.execute(batch)
    kept_ids = [entry_id for entry_id, _ in kept.value]
    assert 10 <= len(kept_ids) < 250
    assert kept_ids == [reply.value for reply in ids][-len(kept_ids) :]


async def test_a_stream_is_not_another_type(backend):
    batch = Batch()
    batch.hset("h", {"a": "1"})
    await backend.execute(batch)
    batch = Batch()
    append(batch, "h", 1)
    with pytest.raises((WrongTypeError, TypeError)):
        await backend.execute(batch)


# --- rooms (SPEC §15)


async def test_occupy_counts_sessions_per_user_announces_transitions_and_indexes(backend):
    with trio.fail_after(TIME_LIMIT):
        async with backend.subscription() as subscription:
            await subscription.subscribe("chat:room:r")
            answers = []
            for session, user, delta in [
                ("a1", "alice", 1),  # alice arrives: announced
                ("a2", "alice", 1),  # her second device: not
                ("a2", "alice", 1),  # the same again: nothing changes
                ("b1", "bob", 1),
                ("a1", "alice", -1),
                ("a1", "alice", -1),  # a cleanup sent twice: nothing more
                ("a2", "alice", -1),  # her last: announced
                ("c1", "carol", -1),  # never there: nothing to announce
                ("b1", "bob", -1),
            ]:
                batch = Batch()
                event = f"{user}{delta:+d}"
                reply = batch.occupy("r", session, user, delta, ttl=30, event=event)
                await backend.execute(batch)
                batch = Batch()  # (a script may run after the rest of its round trip)
                index = batch.zrevrange("ws:rooms", 10)
                ttl = batch.ttl("ws:room:r:users")
                members = batch.zrangebyscore("ws:room:r", 0, math.inf)
                await backend.execute(batch)
                answers.append((reply.value, index.value, ttl.value is not None, members.value))
            published = await take(subscription, 4)
    assert answers == [
        ((True, 1, 1), [("r", 1.0)], True, ["a1"]),
        ((True, 2, 1), [("r", 1.0)], True, ["a1", "a2"]),
        ((False, 2, 1), [("r", 1.0)], True, ["a1", "a2"]),
        ((True, 1, 2), [("r", 2.0)], True, ["a1", "a2", "b1"]),
        ((True, 1, 2), [("r", 2.0)], True, ["a2", "b1"]),
        ((False, 1, 2), [("r", 2.0)], True, ["a2", "b1"]),
        ((True, 0, 1), [("r", 1.0)], True, ["b1"]),
        ((False, 0, 1), [("r", 1.0)], True, ["b1"]),
        ((True, 0, 0), [], False, []),
    ]
    assert [message for _, message in published] == ["alice+1", "bob+1", "alice-1", "bob-1"]
    assert await read_hash_of(backend, "ws:room:r:users") == {}


async def test_renewing_a_room_counts_again_only_the_sessions_redis_lost(backend):
    batch = Batch()
    batch.occupy("r", "a1", "alice", 1, ttl=30, event=None)
    await backend.execute(batch)
    batch = Batch()
    batch.delete("ws:room:r", "ws:room:r:users", "ws:rooms")  # as after a restart of Redis
    await backend.execute(batch)
    for _ in range(2):  # the second renewal finds every one counted
        batch = Batch()
        users = batch.renew_room("r", {"a1": "alice", "a2": "alice", "b1": "bob"}, ttl=30)
        await backend.execute(batch)
        assert users.value == 2
        assert await read_hash_of(backend, "ws:room:r:users") == {"alice": "2", "bob": "1"}
    batch = Batch()
    index = batch.zrevrange("ws:rooms", 10)
    await backend.execute(batch)
    assert index.value == [("r", 2.0)]


async def test_read_markers_move_forward_only_and_announce_when_they_move(backend):
    with trio.fail_after(TIME_LIMIT):
        async with backend.subscription() as subscription:
            await subscription.subscribe("chat:room:r")
            moved = []
            for user, message_id, ordered in [
                ("alice", "5-0", True),
                ("alice", "4-9", True),  # back: no
                ("alice", "5-0", True),  # the same: no
                ("alice", "5-1", True),
                ("alice", "10-0", True),  # numbers, not strings: 10 > 5
                ("bob", "b", False),  # without history: any change
                ("bob", "a", False),
                ("bob", "a", False),
            ]:
                batch = Batch()
                reply = batch.mark_read(
                    "r", user, message_id, ttl=30, ordered=ordered, event=f"{user}:{message_id}"
                )
                await backend.execute(batch)
                moved.append(reply.value)
            published = await take(subscription, 5)
            batch = Batch()
            ttl = batch.ttl("ws:read:r")
            await backend.execute(batch)
    assert moved == [True, False, False, True, True, True, True, False]
    assert [message for _, message in published] == [
        "alice:5-0",
        "alice:5-1",
        "alice:10-0",
        "bob:b",
        "bob:a",
    ]
    assert await read_hash_of(backend, "ws:read:r") == {"alice": "10-0", "bob": "a"}
    assert 29 < ttl.value <= 30


async def test_count_after_random_fields_and_the_highest_scores(backend):
    batch = Batch()
    ids = [append(batch, "s", n) for n in range(5)]
    batch.hset("h", {f"f{n}": str(n) for n in range(5)})
    batch.zadd("z", {"a": 1, "b": 3, "c": 2, "d": 3})
    await backend.execute(batch)
    batch = Batch()
    after_first = batch.count_after("s", ids[0].value, 100)
    capped = batch.count_after("s", "0-0", 3)
    none = batch.count_after("missing", "0-0", 3)
    some = batch.hrandfield("h", 3)
    every = batch.hrandfield("h", 10)
    nothing = batch.hrandfield("missing", 10)
    top = batch.zrevrange("z", 3)
    await backend.execute(batch)
    assert (after_first.value, capped.value, none.value) == (4, 3, 0)
    assert len(some.value) == 3
    assert some.value.items() <= every.value.items()
    assert every.value == {f"f{n}": str(n) for n in range(5)}
    assert nothing.value == {}
    assert top.value == [("d", 3.0), ("b", 3.0), ("c", 2.0)]


async def read_hash_of(backend, key):
    batch = Batch()
    reply = batch.hgetall(key)
    await backend.execute(batch)
    return reply.value


async def test_the_script_is_loaded_again_after_redis_restarted_empty(redis_server):
    async with open_redis_backend(redis_server.url, command_timeout=2) as backend:
        batch = Batch()
        first = append(batch, "s", 1)
        await backend.execute(batch)
        redis_server.restart()  # empty, without the script
        with trio.fail_after(TIME_LIMIT):
            while True:
                batch = Batch()
                second = append(batch, "s", 2)
                try:
                    await backend.execute(batch)
                    break
                except BackendUnavailable:
                    await trio.sleep(0.05)  # the pool reconnects
        batch = Batch()
        entries = batch.xrange("s", "-", "+", 10)
        # the other scripts too, each loaded when first missing
        counted = batch.occupy("r", "s1", "alice", 1, ttl=30, event=None)
        renewed = batch.renew_room("r", {"s2": "bob"}, ttl=30)
        marked = batch.mark_read("r", "alice", "1-0", ttl=30, ordered=True, event=None)
        after = batch.count_after("s", "0-0", 10)
        await backend.execute(batch)
    assert first.value != second.value
    assert entries.value == [(second.value, {"m": '{"n":2}'})]
    assert (counted.value, marked.value, after.value) == ((True, 1, 1), True, 1)
    assert renewed.value == 2


# --- opening


async def test_open_backend_schemes(redis_server):
    with trio.fail_after(TIME_LIMIT):
        async with open_backend("memory://", command_timeout=1) as backend:
            assert isinstance(backend, MemoryBackend)
            assert backend.url == "memory://"
        async with open_backend(f"unix://{redis_server.unix_socket}", command_timeout=1) as unix:
            await write(unix, "over a unix socket")
            assert await read(unix) == "over a unix socket"
        with pytest.raises(ConfigError, match=r"redis\.url: unsupported scheme 'http'"):
            await open_and_close(open_backend("http://127.0.0.1/", command_timeout=1))
        with pytest.raises(ConfigError, match=r"redis\.url: .*integer"):
            await open_and_close(open_backend("redis://127.0.0.1:port/0", command_timeout=1))


async def test_the_url_never_shows_the_password(redis_server):
    url = f"redis://:secret@127.0.0.1:{redis_server.port}/0"  # any password opens a nopass server
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(url, command_timeout=1) as backend:
            assert backend.url == redis_server.url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:secret@127.0.0.1:{port}/0", "redis://127.0.0.1:{port}/0"),
        ("rediss://user:secret@127.0.0.1:{port}/0", "rediss://user@127.0.0.1:{port}/0"),
        ("redis://127.0.0.1:{port}/0?password=secret&db=0", "redis://127.0.0.1:{port}/0?db=0"),
        ("unix://:secret@{socket}", "unix://{socket}"),
    ],
)
async def test_opening_an_unreachable_redis_fails_naming_it(redis_server, url, shown):
    redis_server.kill()
    where = {"port": redis_server.port, "socket": redis_server.unix_socket}
    with trio.fail_after(TIME_LIMIT), pytest.raises(BackendUnavailable) as info:
        await open_and_close(open_backend(url.format(**where), command_timeout=1))
    assert shown.format(**where) in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"!not a RESP type\r\n", "not RESP"),
        (b"-LOADING Redis is loading the dataset in memory\r\n", "loading"),
        (b"", "closed the connection"),
    ],
)
async def test_a_server_that_does_not_speak_redis_is_unavailable(answer, said):
    # what a port that is not Redis (or a Redis still loading) answers to the handshake's PING
    async def serve(stream):
        async with stream:
            await stream.receive_some()
            if answer:
                await stream.send_all(answer)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(TIME_LIMIT), pytest.raises(BackendUnavailable, match=said) as info:
            await open_and_close(open_backend(f"redis://127.0.0.1:{port}/0", command_timeout=1))
        assert not info.value.sent  # the handshake failed: nothing of a batch was written
        nursery.cancel_scope.cancel()


# --- Redis going away


async def test_execute_fails_while_redis_is_down_then_recovers(redis_server):
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(redis_server.url, command_timeout=0.5) as backend:
            names_it = re.escape(redis_server.url)
            for attempt in range(3):  # a client that failed is replaced; recovery is every time
                await write(backend, f"attempt {attempt}")
                redis_server.kill()
                for _ in range(2):
                    with pytest.raises(BackendUnavailable, match=names_it) as refused:
                        await read(backend)
                    assert not refused.value.sent  # refused: nothing was written
                redis_server.start()
                assert await read(backend) is None  # an empty server
                await write(backend, "back")
                assert await read(backend) == "back"


async def test_execute_gives_up_on_a_paused_redis_within_the_timeout(redis_server):
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(redis_server.url, command_timeout=0.3) as backend:
            await write(backend, "kept")
            redis_server.pause()
            try:
                for _ in range(2):  # on a pooled connection, then connecting afresh
                    started = trio.current_time()
                    with pytest.raises(BackendUnavailable) as unanswered:
                        await read(backend)
                    assert trio.current_time() - started < 0.3 + 0.2
                    # on the open connection it was written, and may run when Redis resumes;
                    # a new connection's handshake got no answer: nothing was written
                    assert unanswered.value.sent is (_ == 0)
            finally:
                redis_server.resume()
            assert await read(backend) == "kept"


async def test_concurrent_batches_share_round_trips(redis_server, monkeypatch):
    pipelines = []
    pipeline = RedisBackend._pipeline

    async def counted(self, commands):
        pipelines.append(len(commands))
        return await pipeline(self, commands)

    monkeypatch.setattr(RedisBackend, "_pipeline", counted)
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(redis_server.url, command_timeout=1) as backend:
            async with trio.open_nursery() as nursery:
                for n in range(100):
                    nursery.start_soon(write, backend, f"v{n}", f"k{n}")
            assert [await read(backend, f"k{n}") for n in (0, 99)] == ["v0", "v99"]
    # 100 batches of one command in at most two round trips (the first batch may go alone),
    # then one per read
    writes = pipelines[:-2]
    assert sum(writes) == 100, pipelines
    assert len(writes) <= 2, pipelines
    assert pipelines[-2:] == [1, 1], pipelines


async def test_a_batch_queued_behind_a_slow_pipeline_is_not_reported_failed(
    redis_server, monkeypatch
):
    # Redis answers within the timeout, but slower than half of it: a batch queued behind a
    # pipeline that is out waits for it, and then its own round trip, and succeeds. (It must
    # never be reported as failed after it ran.)
    pipeline = RedisBackend._pipeline

    async def slow(self, commands):
        await trio.sleep(0.2)
        return await pipeline(self, commands)

    results = {}

    async def one(n):
        try:
            await write(backend, f"v{n}", f"k{n}")
        except BackendUnavailable:
            results[n] = "unavailable"
        else:
            results[n] = "ok"

    with trio.fail_after(TIME_LIMIT):
        async with open_backend(redis_server.url, command_timeout=0.3) as backend:
            monkeypatch.setattr(RedisBackend, "_pipeline", slow)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 1)
                await trio.sleep(0.01)
                nursery.start_soon(one, 2)
            monkeypatch.setattr(RedisBackend, "_pipeline", pipeline)
            assert results == {1: "ok", 2: "ok"}
            assert [await read(backend, key) for key in ("k1", "k2")] == ["v1", "v2"]


async def test_a_closed_redis_backend_fails_at_once(redis_server):
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(redis_server.url, command_timeout=1) as backend:
            await write(backend, "v")
        started = trio.current_time()
        with pytest.raises(BackendUnavailable, match="closed") as closed:
            await read(backend)
        assert trio.current_time() - started < 0.1
        assert not closed.value.sent


async def test_batches_queued_behind_a_paused_redis_fail_within_the_timeout(redis_server):
    failed = []

    async def one(n):
        with pytest.raises(BackendUnavailable):
            await read(backend, f"k{n}")
        failed.append(trio.current_time() - started)

    with trio.fail_after(TIME_LIMIT):
        async with open_backend(redis_server.url, command_timeout=0.3) as backend:
            await write(backend, "kept")
            redis_server.pause()
            try:
                started = trio.current_time()
                async with trio.open_nursery() as nursery:
                    for n in range(10):
                        nursery.start_soon(one, n)
            finally:
                redis_server.resume()
            assert len(failed) == 10
            assert max(failed) < 0.3 + 0.2, failed
            assert await read(backend) == "kept"


async def test_a_round_trip_given_up_by_its_caller_leaves_the_backend_usable(redis_server):
    # the caller gives up halfway; the round trip runs to its timeout, its connection is never
    # used again (its reply may still come), and the next batch connects afresh
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(redis_server.url, command_timeout=0.3) as backend:
            await write(backend, "kept")
            for _ in range(3):
                redis_server.pause()
                with trio.move_on_after(0.1):
                    with pytest.raises(BackendUnavailable):
                        await read(backend)
                redis_server.resume()
                assert await read(backend) == "kept"


def redis_command(redis_server, command):
    """``command`` (inline syntax) on a connection of its own; Redis's answer."""
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=2) as raw:
        raw.sendall(command.encode() + b"\r\n")
        return raw.recv(256)


async def test_a_connection_redis_closed_while_idle_is_replaced_before_use(redis_server):
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(redis_server.url, command_timeout=1) as backend:
            await write(backend, "kept")
            # Redis closes the backend's connection (not this one: SKIPME)
            assert redis_command(redis_server, "CLIENT KILL TYPE normal SKIPME yes") == b":1\r\n"
            await trio.sleep(0.05)
            assert await read(backend) == "kept"  # not "unavailable": it connected again


async def test_a_password_and_a_database_from_the_url(redis_server):
    assert redis_command(redis_server, "CONFIG SET requirepass s3cret") == b"+OK\r\n"
    base = f"127.0.0.1:{redis_server.port}"
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(f"redis://:s3cret@{base}/3", command_timeout=1) as backend:
            await write(backend, "in db 3")
        async with open_backend(f"redis://default:s3cret@{base}/3", command_timeout=1) as again:
            assert await read(again) == "in db 3"
        async with open_backend(f"redis://:s3cret@{base}/0", command_timeout=1) as db0:
            assert await read(db0) is None
        with pytest.raises(BackendUnavailable, match="refused") as refused:
            await open_and_close(open_backend(f"redis://:wrong@{base}/0", command_timeout=1))
        assert "wrong" not in str(refused.value)
        assert not refused.value.sent


async def test_messages_raise_when_redis_is_killed(redis_server):
    with trio.fail_after(TIME_LIMIT):
        async with open_backend(redis_server.url, command_timeout=0.5) as backend:
            async with backend.subscription() as subscription:
                await subscription.subscribe("c")
                redis_server.kill()
                with pytest.raises(BackendUnavailable, match="lost the Pub/Sub connection"):
                    await take(subscription, 1)
                with pytest.raises(BackendUnavailable):
                    await subscription.subscribe("d")
            with pytest.raises(BackendUnavailable):
                await open_and_close(backend.subscription())

            redis_server.start()
            async with backend.subscription() as subscription:  # the owner subscribes again
                await subscription.subscribe("c")
                batch = Batch()
                batch.publish("c", "again")
                await backend.execute(batch)
                assert await take(subscription, 1) == [("c", "again")]


async def test_a_paused_redis_is_noticed_by_a_silent_subscription(redis_server):
    with trio.fail_after(TIME_LIMIT):
        async with open_redis_backend(
            redis_server.url, command_timeout=0.3, ping_interval=0.5
        ) as backend:
            async with backend.subscription() as subscription:
                await subscription.subscribe("c")
                redis_server.pause()
                try:
                    with pytest.raises(BackendUnavailable):
                        await subscription.subscribe("d")
                    with pytest.raises(BackendUnavailable):
                        await open_and_close(backend.subscription())
                    # coredis PINGs a connection silent for ping_interval (1 s at least)
                    with trio.fail_after(1 + 0.3 + 0.5):
                        with pytest.raises(BackendUnavailable):
                            await take(subscription, 1)
                finally:
                    redis_server.resume()


async def test_errors_raised_inside_open_backend_are_not_wrapped(redis_server):
    with trio.fail_after(TIME_LIMIT):
        with pytest.raises(LookupError, match="mine"):
            await fail_inside(open_backend(redis_server.url, command_timeout=1))


# --- memory only: trio's clock


async def test_memory_keys_expire_on_trio_clock(autojump_clock):
    backend = MemoryBackend()
    await write(backend, "v")
    batch = Batch()
    batch.expire("key", 60)
    await backend.execute(batch)
    await trio.sleep(59)
    batch = Batch()
    ttl = batch.ttl("key")
    await backend.execute(batch)
    assert ttl.value == pytest.approx(1)
    await trio.sleep(2)
    assert await read(backend) is None


async def test_memory_sweeps_expired_keys_nobody_reads(autojump_clock):
    backend = MemoryBackend()
    batch = Batch()
    for n in range(100):
        batch.set(f"key:{n}", "v", ex=1)
    await backend.execute(batch)
    await trio.sleep(2)
    await backend.execute(Batch())
    assert not backend._keyspace._values  # private, but it is what would leak


def test_commands_are_packed_as_resp2_bulk_strings():
    packed = pack(
        [
            ["ZADD", "z", 1.5, b"\xffm"],
            ["EXPIRE", "z", 10],
            ["ZRANGEBYSCORE", "z", -math.inf, math.inf],
        ]
    )
    assert packed == (
        b"*4\r\n$4\r\nZADD\r\n$1\r\nz\r\n$3\r\n1.5\r\n$2\r\n\xffm\r\n"
        b"*3\r\n$6\r\nEXPIRE\r\n$1\r\nz\r\n$2\r\n10\r\n"
        b"*4\r\n$13\r\nZRANGEBYSCORE\r\n$1\r\nz\r\n$4\r\n-inf\r\n$3\r\ninf\r\n"
    )
    # a non-ASCII string is counted in bytes
    assert pack([["PUBLISH", "c", "é"]]).endswith(b"$2\r\n\xc3\xa9\r\n")
