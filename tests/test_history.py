"""History and reconnect recovery (SPEC §11), on real servers: append and publish in one step,
join with ``since``, scrollback, history off."""

from __future__ import annotations

import pytest
import trio
from _chat import make_config, make_token, open_backend, start

from trio_chat._store.interface import Batch
from trio_chat._store.redis import make_client
from trio_chat.client import ServerError, open_client

TIME_LIMIT = 10


@pytest.fixture
def store_url(backend_url: str) -> str:
    return backend_url


async def _sends(chat, room: str, values) -> list[dict]:
    return [await chat.send(room, value) for value in values]


async def _receive(chat, count: int) -> list[dict]:
    return [await chat.receive() for _ in range(count)]


async def test_a_message_id_is_its_stream_entry_id_on_every_instance(redis_server, nursery):
    one = await start(nursery, make_config(redis_server.url, "inst-1"))
    two = await start(nursery, make_config(redis_server.url, "inst-2"))
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(one.url, make_token("alice")) as alice,
            open_client(two.url, make_token("bob")) as bob,
        ):
            await alice.join("room")
            await bob.join("room")
            acks = await _sends(alice, "room", range(3))
            received = await _receive(bob, 3)
    assert [m["id"] for m in received] == [a["id"] for a in acks]
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        batch = Batch()
        entries = batch.xrange("chat:room:room", "-", "+", 10)
        await backend.execute(batch)
    assert [entry_id for entry_id, _ in entries.value] == [a["id"] for a in acks]


async def test_a_client_back_with_since_gets_exactly_what_it_missed_then_live(
    redis_server, nursery
):
    one = await start(nursery, make_config(redis_server.url, "inst-1"))
    two = await start(nursery, make_config(redis_server.url, "inst-2"))
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(one.url, make_token("alice")) as alice,
            open_client(one.url, make_token("carol")) as carol,  # stays all along
        ):
            await alice.join("room")
            await carol.join("room")
            async with open_client(two.url, make_token("bob")) as bob:
                await bob.join("room")
                await alice.send("room", "before")
                last_seen = (await bob.receive())["id"]
            missed = await _sends(alice, "room", [f"missed {n}" for n in range(5)])
            stayed = await _receive(carol, 6)
            async with open_client(two.url, make_token("bob")) as bob:
                joined = await bob.request("join", room="room", since=last_seen)
                replayed = await _receive(bob, 5)
                live = await alice.send("room", "live")
                after = await bob.receive()
    assert (joined["recovered"], joined["missed"]) == (True, 5)
    assert [m["id"] for m in replayed] == [a["id"] for a in missed]
    assert replayed == stayed[1:]  # exactly as they were delivered live
    assert (after["id"], after["data"]) == (live["id"], "live")


async def test_recovery_on_both_backends(store_url, nursery):
    server = await start(nursery, make_config(store_url, history={"size": 5}))
    with trio.fail_after(TIME_LIMIT):
        async with open_client(server.url, make_token("alice")) as alice:
            await alice.join("room")
            acks = await _sends(alice, "room", range(8))
            async with open_client(server.url, make_token("bob")) as bob:
                # since the 4th: four follow, and the stream still holds the 4th
                kept = await bob.request("join", room="room", since=acks[3]["id"])
                assert [m["data"] for m in await _receive(bob, 4)] == [4, 5, 6, 7]
                # since the first: trimmed away, so not recovered; the latest five still come
                # (memory keeps exactly 5; Redis's MAXLEN ~ keeps more, but 7 follow > size)
                gone = await bob.request("join", room="room", since=acks[0]["id"])
                assert [m["data"] for m in await _receive(bob, 5)] == [3, 4, 5, 6, 7]
                # the latest: nothing missed
                caught_up = await bob.request("join", room="room", since=acks[7]["id"])
                assert (await bob.ping())["type"] == "pong"
    assert (kept["recovered"], kept["missed"]) == (True, 4)
    assert (gone["recovered"], gone["missed"]) == (False, 5)
    assert (caught_up["recovered"], caught_up["missed"]) == (True, 0)


async def test_an_expired_stream_is_not_recovered(store_url, nursery):
    server = await start(nursery, make_config(store_url, history={"ttl": 0.2}))
    with trio.fail_after(TIME_LIMIT):
        async with open_client(server.url, make_token("alice")) as alice:
            await alice.join("room")
            since = (await alice.send("room", 1))["id"]
            await trio.sleep(0.3)
            joined = await alice.request("join", room="room", since=since)
    assert (joined["recovered"], joined["missed"]) == (False, 0)


@pytest.mark.parametrize("since", ["12", "abc-1", "1-2-3", "-1-0", "99999999999999999999999-0", ""])
async def test_a_malformed_since_is_refused_and_the_room_not_joined(nursery, since):
    server = await start(nursery, make_config())
    async with open_client(server.url, make_token("alice")) as alice:
        with pytest.raises(ServerError) as refused:
            await alice.request("join", room="room", since=since)
        assert refused.value.code == "bad_request"
        with pytest.raises(ServerError) as not_joined:
            await alice.send("room", 1)
        assert not_joined.value.code == "not_in_room"


async def test_history_pages_back_until_more_is_false(store_url, nursery):
    server = await start(nursery, make_config(store_url))
    with trio.fail_after(TIME_LIMIT):
        async with open_client(server.url, make_token("alice")) as alice:
            with pytest.raises(ServerError) as refused:
                await alice.request("history", room="room")
            assert refused.value.code == "not_in_room"
            await alice.join("room")
            acks = await _sends(alice, "room", range(7))
            pages, before = [], None
            while True:
                fields = {"room": "room", "limit": 3} | ({"before": before} if before else {})
                page = await alice.request("history", **fields)
                pages.append([m["data"] for m in page["messages"]])
                if not page["more"]:
                    break
                before = page["messages"][0]["id"]
            latest = await alice.request("history", room="room")
    assert pages == [[4, 5, 6], [1, 2, 3], [0]]
    assert latest["messages"][-1] == {
        "id": acks[-1]["id"],
        "room": "room",
        "from": "alice",
        "data": 6,
        "ts": acks[-1]["ts"],
    }
    assert (len(latest["messages"]), latest["more"]) == (7, False)


@pytest.mark.parametrize(
    "fields", [{"limit": 0}, {"limit": 101}, {"limit": "5"}, {"limit": True}, {"before": "x"}]
)
async def test_a_bad_history_request_is_bad_request(nursery, fields):
    server = await start(nursery, make_config())
    async with open_client(server.url, make_token("alice")) as alice:
        await alice.join("room")
        with pytest.raises(ServerError) as refused:
            await alice.request("history", room="room", **fields)
        assert refused.value.code == "bad_request"


async def test_direct_messages_are_never_stored(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url))
    async with (
        open_client(server.url, make_token("alice")) as alice,
        open_client(server.url, make_token("bob")) as bob,
    ):
        await alice.direct("bob", "secret")
        assert (await bob.receive())["data"] == "secret"
    async with make_client(redis_server.url, timeout=1) as client:
        keys = await client.keys("*")  # every key
    assert not [key for key in keys if not key.startswith(("ws:", "auth:"))]


async def test_history_off(store_url, nursery):
    server = await start(nursery, make_config(store_url, history={"size": 0}))
    async with (
        open_client(server.url, make_token("alice")) as alice,
        open_client(server.url, make_token("bob")) as bob,
    ):
        await alice.join("room")
        assert await bob.join("room") == {
            "type": "joined",
            "room": "room",
            "read": None,
            "unread": None,
            "ref": 1,
        }
        ack = await alice.send("room", 1)
        assert (await bob.receive())["id"] == ack["id"]
        joined = await bob.request("join", room="room", since=ack["id"])
        assert (joined["recovered"], joined["missed"]) == (False, 0)
        page = await bob.request("history", room="room")
        assert (page["messages"], page["more"]) == ([], False)


async def test_history_off_writes_no_stream(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url, history={"size": 0}))
    async with open_client(server.url, make_token("alice")) as alice:
        await alice.join("room")
        await alice.send("room", 1)
    async with open_backend(redis_server.url, command_timeout=1) as backend:
        batch = Batch()
        stream = batch.exists("chat:room:room")
        await backend.execute(batch)
    assert stream.value == 0


async def test_a_first_join_names_the_last_message_to_rejoin_from(store_url, nursery):
    server = await start(nursery, make_config(store_url))
    with trio.fail_after(TIME_LIMIT):
        async with open_client(server.url, make_token("alice")) as alice:
            empty = await alice.join("room")
            before = await alice.send("room", "before bob")
            async with open_client(server.url, make_token("bob")) as bob:
                joined = await bob.join("room")  # and his connection drops at once
            after = await alice.send("room", "while bob was away")
            async with open_client(server.url, make_token("bob")) as bob:
                rejoined = await bob.request("join", room="room", since=joined["last"])
                replayed = await bob.receive()
    assert empty["last"] is None  # no stream yet
    assert joined["last"] == before["id"]
    assert (rejoined["recovered"], rejoined["missed"], rejoined["last"]) == (True, 1, after["id"])
    assert replayed["id"] == after["id"]
