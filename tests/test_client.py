"""The Python client: its reconnecting mode comes back by itself and recovers what it missed;
presence, signals and read markers (SPEC §15) across instances, events through ``receive``."""

from __future__ import annotations

from functools import partial
from typing import Any

import attrs
import pytest
import trio
from _chat import ADMIN, admin_client, make_config, make_token, start
from _redis_server import free_port

import trio_chat
from trio_chat._config import RoomOptions
from trio_chat.client import LoggedOut, ServerError, open_client, open_reconnecting_client

TIME_LIMIT = 15


async def _instance(nursery, config):
    """Start a server in a scope of its own, to stop it (a drain: 1001) without the test."""
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            async with trio.open_nursery() as inner:
                task_status.started(await start(inner, config))

    server = await nursery.start(run)
    return server, scope


async def test_it_reconnects_after_a_drain_and_recovers_what_it_missed(redis_server, nursery):
    port = free_port()
    config = make_config(redis_server.url, "inst-a")
    config = attrs.evolve(config, server=attrs.evolve(config.server, port=port))
    other = await start(nursery, make_config(redis_server.url, "inst-b"))
    tokens = []

    async def token() -> str:
        tokens.append(make_token("bob"))
        return tokens[-1]

    with trio.fail_after(TIME_LIMIT):
        server, scope = await _instance(nursery, config)
        async with (
            open_client(other.url, make_token("alice")) as alice,
            open_reconnecting_client(server.url, token, min_delay=0.05, max_delay=0.2) as bob,
        ):
            await alice.join("room")
            await bob.join("room")
            await alice.send("room", "before")
            assert (await bob.receive())["data"] == "before"
            scope.cancel()  # instance a drains: bob's socket closes with 1001
            missed = [(await alice.send("room", n))["id"] for n in range(5)]
            await _instance(nursery, config)  # back on the same port
            rejoined = await bob.receive()
            replayed = [await bob.receive() for _ in range(5)]
            live = await alice.send("room", "live")
            after = await bob.receive()
            sent = await bob.send("room", "bob is back")
            assert (await alice.receive())["data"] == "bob is back"
    assert (rejoined["type"], rejoined["recovered"], rejoined["missed"]) == ("joined", True, 5)
    assert [m["id"] for m in replayed] == missed
    assert after["id"] == live["id"]
    assert bob.reconnects >= 1
    assert len(tokens) == 1 + bob.reconnects  # a fresh token for every connection
    # the last message it received (its own ack does not count: see ReconnectingClient.send)
    assert bob.rooms == {"room": live["id"]} != {"room": sent["id"]}


async def test_a_ban_ends_it_for_good(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url, admin=ADMIN))
    with trio.fail_after(TIME_LIMIT):
        async with open_reconnecting_client(server.url, make_token("bob")) as bob:
            await bob.join("room")
            async with admin_client(server) as http:
                assert (await http.post("/v1/users/bob/ban")).status_code == 200
            assert await bob.receive() == {"type": "logout", "reason": "banned"}
            with pytest.raises(LoggedOut) as ended:
                await bob.receive()
            with pytest.raises(LoggedOut):
                await bob.ping()
    assert (ended.value.code, bob.reconnects) == (4403, 0)


async def test_it_recovers_what_was_said_in_a_room_empty_when_it_joined(redis_server, nursery):
    port = free_port()
    config = make_config(redis_server.url, "inst-a")
    config = attrs.evolve(config, server=attrs.evolve(config.server, port=port))
    other = await start(nursery, make_config(redis_server.url, "inst-b"))
    with trio.fail_after(TIME_LIMIT):
        server, scope = await _instance(nursery, config)
        async with (
            open_client(other.url, make_token("alice")) as alice,
            open_reconnecting_client(server.url, make_token("bob"), max_delay=0.2) as bob,
        ):
            await bob.join("quiet")  # nothing said there yet
            await alice.join("quiet")
            scope.cancel()
            said = await alice.send("quiet", "while bob was away")
            await _instance(nursery, config)
            rejoined = await bob.receive()
            replayed = await bob.receive()
    assert (rejoined["type"], rejoined["missed"]) == ("joined", 1)
    assert replayed["id"] == said["id"]


class Names:
    """The application's connect hook: a display name for everyone (presence shows it)."""

    async def connect(self, event: trio_chat.ConnectEvent) -> trio_chat.Allow:
        return trio_chat.Allow(info={"name": event.user.title()})


async def _rooms_instance(
    nursery, redis_url: str, instance_id: str, *rooms: RoomOptions, **sections: Any
) -> trio_chat.Server:
    """An instance with ``[[rooms]]`` tables and the :class:`Names` hook."""
    config = attrs.evolve(make_config(redis_url, instance_id, **sections), rooms=rooms)
    server: trio_chat.Server = await nursery.start(partial(trio_chat.serve, hooks=Names()), config)
    return server


def _users(presence: dict[str, Any]) -> list[tuple[str, Any, int]]:
    return sorted((u["user"], u["info"], u["sessions"]) for u in presence["users"])


async def test_presence_and_its_events_are_per_user_across_instances(redis_server, nursery):
    lobby = RoomOptions(match="lobby", presence_events=True)
    a = await _rooms_instance(nursery, redis_server.url, "inst-a", lobby)
    b = await _rooms_instance(nursery, redis_server.url, "inst-b", lobby)
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(a.url, make_token("alice")) as alice,
            open_reconnecting_client(b.url, make_token("carol")) as carol,
            open_client(b.url, make_token("bob")) as bob_laptop,
        ):
            await alice.join("lobby")
            await carol.join("lobby")
            carol_joined = await alice.receive()
            await bob_laptop.join("lobby")
            bob_joined = [await alice.receive(), await carol.receive()]
            async with open_client(a.url, make_token("bob")) as bob_phone:
                await bob_phone.join("lobby")  # a second device: no event
                here = await carol.presence("lobby")
                await bob_laptop.leave("lobby")  # the other device stays: no event
                with pytest.raises(ServerError) as outside:
                    await bob_laptop.presence("lobby")
            # the phone's socket closed: bob's last session is gone
            bob_left = [await alice.receive(), await carol.receive()]
    assert carol_joined == {
        "type": "presence_join",
        "room": "lobby",
        "user": "carol",
        "info": {"name": "Carol"},
    }
    assert bob_joined == 2 * [
        {"type": "presence_join", "room": "lobby", "user": "bob", "info": {"name": "Bob"}}
    ]
    assert bob_left == 2 * [{"type": "presence_leave", "room": "lobby", "user": "bob"}]
    assert (here["type"], here["room"], here["count"]) == ("presence", "lobby", 3)
    assert not here.get("truncated")
    assert _users(here) == [
        ("alice", {"name": "Alice"}, 1),
        ("bob", {"name": "Bob"}, 2),
        ("carol", {"name": "Carol"}, 1),
    ]
    assert outside.value.code == "not_in_room"


async def test_signals_reach_the_others_and_a_refusal_comes_with_its_ref(redis_server, nursery):
    quiet = RoomOptions(match="quiet-*", signals=False)
    limits = {"signal_rate": 0.1, "signal_burst": 3}
    a = await _rooms_instance(nursery, redis_server.url, "inst-a", quiet, limits=limits)
    b = await _rooms_instance(nursery, redis_server.url, "inst-b", quiet, limits=limits)
    typing = {"type": "signal", "room": "lobby", "from": "alice", "data": {"typing": True}}
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(a.url, make_token("alice")) as alice,
            open_client(b.url, make_token("alice")) as alice_phone,
            open_client(b.url, make_token("bob")) as bob,
        ):
            for chat in (alice, alice_phone, bob):
                await chat.join("lobby")
            await alice.join("quiet-1")
            await bob.join("quiet-1")
            sent = await alice.signal("lobby", {"typing": True})
            got = [await bob.receive(), await alice_phone.receive()]
            forbidden = await alice.signal("quiet-1", {"typing": True})
            refusals = [await alice.receive()]
            outside = await alice.signal("elsewhere", {"typing": True})
            refusals.append(await alice.receive())
            # the budget (burst 3): the fourth is refused, and the socket stays open
            over = [await bob.signal("lobby", n) for n in range(4)][-1]
            refusals.append(await bob.receive())
            assert (await bob.ping())["type"] == "pong"
            await bob.send("lobby", "after the signals")
            # alice does not get her own signal back: it would come before bob's
            after = [await alice.receive() for _ in range(4)]
            phone = [await alice_phone.receive() for _ in range(4)]
            history = await bob.request("history", room="lobby")
    assert isinstance(sent, int)
    assert got == [typing, typing]
    assert [(f["type"], f["code"], f["ref"]) for f in refusals] == [
        ("error", "forbidden", forbidden),
        ("error", "not_in_room", outside),
        ("error", "rate_limited", over),
    ]
    bobs = [("signal", "bob", n) for n in range(3)] + [("message", "bob", "after the signals")]
    assert [(f["type"], f["from"], f["data"]) for f in after] == bobs
    assert [(f["type"], f["from"], f["data"]) for f in phone] == bobs
    assert [m["data"] for m in history["messages"]] == ["after the signals"]  # signals: not stored


async def test_read_markers_move_forward_and_reach_the_users_other_devices(redis_server, nursery):
    a = await _rooms_instance(nursery, redis_server.url, "inst-a")
    b = await _rooms_instance(nursery, redis_server.url, "inst-b")
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(a.url, make_token("alice")) as alice,
            open_client(a.url, make_token("bob")) as bob_laptop,
            open_client(b.url, make_token("bob")) as bob_phone,
        ):
            for chat in (alice, bob_laptop, bob_phone):
                await chat.join("lobby")
            ids = [(await alice.send("lobby", n))["id"] for n in range(3)]
            for chat in (bob_laptop, bob_phone):
                assert [(await chat.receive())["id"] for _ in ids] == ids
            await bob_laptop.read("lobby", ids[1])
            seen = [await bob_phone.receive(), await alice.receive()]
            receipts = await alice.receipts("lobby")
            await bob_phone.read("lobby", ids[0])  # back: nothing moves, nothing is sent
            kept = await bob_phone.receipts("lobby")
            await bob_phone.read("lobby", ids[2])
            forward = await alice.receive()  # the next read event is this one, not ids[0]'s
            newer = await bob_laptop.read("lobby", f"{int(ids[2].split('-')[0]) + 10**6}-0")
            while (refused := await bob_laptop.receive())["type"] == "read":
                pass  # bob_phone's move to ids[2]
            with pytest.raises(ServerError) as outside:
                await alice.receipts("elsewhere")
            async with open_client(b.url, make_token("bob")) as bob_tablet:
                tablet = await bob_tablet.join("lobby")
            async with open_client(b.url, make_token("carol")) as carol:
                fresh = await carol.join("lobby")
    mark = {"type": "read", "room": "lobby", "user": "bob", "id": ids[1]}
    assert seen == [mark, mark]
    assert (receipts["type"], receipts["room"], receipts["read"]) == (
        "receipts",
        "lobby",
        {"bob": ids[1]},
    )
    assert kept["read"] == {"bob": ids[1]}
    assert forward == {**mark, "id": ids[2]}
    assert (refused["type"], refused["code"], refused["ref"]) == ("error", "bad_request", newer)
    assert outside.value.code == "not_in_room"
    assert (tablet["read"], tablet["unread"]) == (ids[2], 0)
    assert (fresh["read"], fresh["unread"]) == (None, 3)


async def test_the_reconnecting_client_drops_signals_but_keeps_read_markers_while_away(
    redis_server, nursery
):
    port = free_port()
    lobby = RoomOptions(match="lobby", presence_events=True)
    config = attrs.evolve(make_config(redis_server.url, "inst-a"), rooms=(lobby,))
    config = attrs.evolve(config, server=attrs.evolve(config.server, port=port))
    other = await _rooms_instance(nursery, redis_server.url, "inst-b", lobby)
    with trio.fail_after(TIME_LIMIT):
        server, scope = await _instance(nursery, config)
        async with (
            open_client(other.url, make_token("alice")) as alice,
            open_reconnecting_client(server.url, make_token("bob"), max_delay=0.2) as bob,
        ):
            await alice.join("lobby")
            joined = await bob.join("lobby")
            came = await alice.receive()
            ids = [(await alice.send("lobby", n))["id"] for n in range(2)]
            assert [(await bob.receive())["id"] for _ in ids] == ids
            scope.cancel()  # instance a drains
            went = await alice.receive()  # bob's only session closed
            while bob.reconnects == 0:  # down, and trying again
                await trio.sleep(0.01)
            away = [await bob.signal("lobby", {"typing": True}), await bob.read("lobby", ids[0])]
            assert await bob.read("lobby", ids[1]) is None  # the latest one is kept
            missed = (await alice.send("lobby", "while bob was away"))["id"]
            await _instance(nursery, config)
            rejoined = await bob.receive()
            replayed = await bob.receive()
            events = [await alice.receive(), await alice.receive()]  # bob back, his marker
            receipts = await bob.receipts("lobby")
            here = await bob.presence("lobby")
            sent = await bob.signal("lobby", {"typing": True})
            typing = await alice.receive()
    assert (joined["read"], joined["unread"]) == (None, 0)
    assert (came["type"], came["user"]) == ("presence_join", "bob")
    assert (went["type"], went["user"]) == ("presence_leave", "bob")
    assert away == [None, None]
    assert (rejoined["type"], rejoined["recovered"], rejoined["missed"]) == ("joined", True, 1)
    assert (rejoined["read"], rejoined["unread"]) == (None, 3)  # the read comes after the join
    assert replayed["id"] == missed
    assert [(e["type"], e["user"]) for e in events] == [("presence_join", "bob"), ("read", "bob")]
    assert events[1]["id"] == ids[1]
    assert receipts["read"] == {"bob": ids[1]}
    assert here["count"] == 2
    assert isinstance(sent, int)
    assert (typing["type"], typing["from"]) == ("signal", "bob")
