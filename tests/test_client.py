"""The Python client's reconnecting mode: it comes back by itself and recovers what it missed."""

from __future__ import annotations

import attrs
import pytest
import trio
from _chat import ADMIN, admin_client, make_config, make_token, start
from _redis_server import free_port

from trio_chat.client import LoggedOut, open_client, open_reconnecting_client

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
