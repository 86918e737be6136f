"""Rooms (SPEC §15) from outside: presence per user, presence events, signals, read markers,
the ``publish`` claim, room options and the operators' room list, on two instances sharing a
real redis-server (presence events and read markers on a Redis Cluster too)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
from _chat import (
    ADMIN,
    SECRET,
    admin_client,
    make_config,
    make_token,
    open_backend,
    read_hash,
    snapshot,
    spawn,
    start,
)

from trio_chat import Allow, Config, ConnectEvent, RoomOptions, serve
from trio_chat._store.interface import Batch
from trio_chat.client import ChatClient, ServerError, open_client

if TYPE_CHECKING:
    from pathlib import Path

TIME_LIMIT = 15


def with_rooms(config: Config, *tables: RoomOptions) -> Config:
    return attrs.evolve(config, rooms=tables)


EVENTS = RoomOptions(match="*", presence_events=True)


async def next_of(chat: ChatClient, *kinds: str) -> dict[str, Any]:
    """The next frame of one of ``kinds``, skipping others (messages, signals...)."""
    while True:
        frame = await chat.receive()
        if frame["type"] in kinds:
            return frame


async def nothing_more(chat: ChatClient, *kinds: str, wait: float = 0.3) -> None:
    """No frame of ``kinds`` arrives within ``wait`` (a ping's pong bounds what was sent
    before it)."""
    await trio.sleep(wait)
    pong = await chat.ping()
    assert pong["type"] == "pong"
    while chat._pending:
        frame = chat._pending.popleft()
        assert frame["type"] not in kinds, frame


async def two_instances(nursery: trio.Nursery, url: str, *tables: RoomOptions, **sections: Any):
    one = await start(nursery, with_rooms(make_config(url, "inst-1", **sections), *tables))
    two = await start(nursery, with_rooms(make_config(url, "inst-2", **sections), *tables))
    return one, two


# --- presence -------------------------------------------------------------------------------


async def test_presence_is_per_user_across_devices_and_instances(redis_or_cluster, nursery):
    one, two = await two_instances(nursery, redis_or_cluster.url, EVENTS)
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(one.url, make_token("carol")) as carol,
            open_client(one.url, make_token("alice")) as laptop,
            open_client(two.url, make_token("alice")) as phone,
            open_client(two.url, make_token("bob")) as bob,
        ):
            await carol.join("room")
            await laptop.join("room")
            joined = await next_of(carol, "presence_join", "presence_leave")
            assert joined == {
                "type": "presence_join",
                "room": "room",
                "user": "alice",
                "info": None,
            }
            await phone.join("room")  # alice's second device: no event
            await bob.join("room")
            assert (await next_of(carol, "presence_join"))["user"] == "bob"
            # the first device sees the others arrive, but not itself
            assert (await next_of(laptop, "presence_join"))["user"] == "bob"

            presence = await bob.request("presence", room="room")
            assert presence["count"] == 3
            assert "truncated" not in presence
            assert sorted((u["user"], u["sessions"]) for u in presence["users"]) == [
                ("alice", 2),
                ("bob", 1),
                ("carol", 1),
            ]

            await laptop.leave("room")  # alice is still there on the phone
            await nothing_more(carol, "presence_leave")
            await phone.leave("room")
            left = await next_of(carol, "presence_join", "presence_leave")
            assert left == {"type": "presence_leave", "room": "room", "user": "alice"}
            presence = await carol.request("presence", room="room")
            assert sorted(u["user"] for u in presence["users"]) == ["bob", "carol"]
            with pytest.raises(ServerError) as refused:
                await laptop.request("presence", room="room")
            assert refused.value.code == "not_in_room"
        # bob's close is a departure too
        async with open_client(one.url, make_token("dave")) as dave:
            await dave.join("room")
            presence = await dave.request("presence", room="room")
            assert [u["user"] for u in presence["users"]] == ["dave"]


async def test_no_presence_events_unless_the_room_asks(redis_server, nursery):
    one, two = await two_instances(nursery, redis_server.url)  # presence_events off by default
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(one.url, make_token("carol")) as carol,
            open_client(two.url, make_token("alice")) as alice,
        ):
            await carol.join("room")
            await alice.join("room")
            await alice.leave("room")
            await nothing_more(carol, "presence_join", "presence_leave")
            presence = await carol.request("presence", room="room")
            assert [u["user"] for u in presence["users"]] == ["carol"]


async def test_presence_shows_the_connect_hooks_info(redis_server, nursery):
    class Names:
        async def connect(self, event: ConnectEvent) -> Allow:
            return Allow(info={"name": event.user.title()})

    config = with_rooms(make_config(redis_server.url, "inst-1"), EVENTS)
    server = await nursery.start(partial(serve, hooks=Names()), config)
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(server.url, make_token("carol")) as carol,
            open_client(server.url, make_token("alice")) as alice,
        ):
            await carol.join("room")
            await alice.join("room")
            joined = await next_of(carol, "presence_join")
            assert joined["info"] == {"name": "Alice"}
            presence = await alice.request("presence", room="room")
            assert {u["user"]: u["info"] for u in presence["users"]} == {
                "alice": {"name": "Alice"},
                "carol": {"name": "Carol"},
            }


async def test_concurrent_joins_and_leaves_make_one_event_per_transition(redis_server, nursery):
    """50 sessions of 10 users on two instances join and leave at random, all at once: what a
    watcher sees replays to the final presence, each user alternating join and leave."""
    one, two = await two_instances(nursery, redis_server.url, EVENTS)
    rng = random.Random(21)
    users = [f"user-{n}" for n in range(10)]
    final: dict[int, bool] = {}

    async def churn(number: int, chat: ChatClient) -> None:
        joined = False
        for _ in range(rng.randint(3, 8)):
            await trio.sleep(rng.random() * 0.02)
            if joined:
                await chat.leave("room")
            else:
                await chat.join("room")
            joined = not joined
        final[number] = joined

    with trio.fail_after(30):
        async with open_client(one.url, make_token("watcher")) as watcher:
            await watcher.join("room")
            async with trio.open_nursery() as clients:
                chats = []
                for number in range(50):
                    server = (one, two)[number % 2]
                    user = users[number % 10]
                    chats.append(await clients.start(_connected, server.url, make_token(user)))
                async with trio.open_nursery() as runs:
                    for number, chat in enumerate(chats):
                        runs.start_soon(churn, number, chat)
                expected = sorted(
                    {users[number % 10] for number, joined in final.items() if joined}
                )
                presence = await watcher.request("presence", room="room")
                assert sorted(u["user"] for u in presence["users"]) == sorted(
                    [*expected, "watcher"]
                )
                # every event is out once the presence frame was answered; read them all
                await trio.sleep(0.3)
                await watcher.ping()
                events = [
                    frame
                    for frame in watcher._pending
                    if frame["type"] in ("presence_join", "presence_leave")
                ]
                clients.cancel_scope.cancel()
    present: set[str] = set()
    for event in events:
        user = event["user"]
        if event["type"] == "presence_join":
            assert user not in present, f"{user} joined twice in a row"
            present.add(user)
        else:
            assert user in present, f"{user} left without having joined"
            present.discard(user)
    assert sorted(present) == expected
    assert len(events) >= len(expected)


async def _connected(url: str, token: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with open_client(url, token) as chat:
        task_status.started(chat)
        await trio.sleep_forever()


async def test_the_reaper_announces_a_dead_instances_users_and_leaves_no_key(
    redis_server, nursery, tmp_path: Path
):
    toml = tmp_path / "rooms.toml"
    toml.write_text('[session]\ninstance_ttl = 1\n[[rooms]]\nmatch = "*"\npresence_events = true\n')
    live = await start(
        nursery,
        with_rooms(make_config(redis_server.url, "live", session={"instance_ttl": 1}), EVENTS),
    )
    process, url = await spawn(tmp_path / "doomed.log", redis_server.url, "doomed", config=toml)
    try:
        with trio.fail_after(TIME_LIMIT):
            async with open_client(live.url, make_token("carol")) as carol:
                await carol.join("room")
                async with open_client(url, make_token("dave")) as dave:
                    await dave.join("room")
                    await dave.join("other")
                    assert (await next_of(carol, "presence_join"))["user"] == "dave"
                    async with open_backend(redis_server.url, command_timeout=1) as backend:
                        rooms = await read_hash(backend, "ws:instance:doomed:rooms")
                        assert [json.loads(v) for v in rooms.values()] == [["other", "room"]]
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                left = await next_of(carol, "presence_leave")
                assert left == {"type": "presence_leave", "room": "room", "user": "dave"}
                async with open_backend(redis_server.url, command_timeout=1) as backend:
                    assert await snapshot(
                        backend,
                        "ws:instance:doomed:rooms",
                        "ws:instance:doomed:sessions",
                        "ws:room:other:users",
                    ) == dict.fromkeys(
                        (
                            "ws:instance:doomed:rooms",
                            "ws:instance:doomed:sessions",
                            "ws:room:other:users",
                        ),
                        0,
                    )
                    assert await read_hash(backend, "ws:room:room:users") == {"carol": "1"}
                    index = Batch()
                    rooms_left = index.zrevrange("ws:rooms", 10)
                    await backend.execute(index)
                    assert rooms_left.value == [("room", 1.0)]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- signals --------------------------------------------------------------------------------


async def test_signals_reach_the_others_and_are_never_stored_or_replayed(redis_server, nursery):
    one, two = await two_instances(nursery, redis_server.url)
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(one.url, make_token("alice")) as laptop,
            open_client(two.url, make_token("alice")) as phone,
            open_client(two.url, make_token("bob")) as bob,
        ):
            for chat in (laptop, phone, bob):
                await chat.join("room")
            await laptop.send_frame({"type": "signal", "room": "room", "data": {"typing": True}})
            sent = await laptop.send("room", "hello")  # in order after the signal
            for chat in (bob, phone):  # the sender's other device too
                assert await chat.receive() == {
                    "type": "signal",
                    "room": "room",
                    "from": "alice",
                    "data": {"typing": True},
                }
                assert (await chat.receive())["id"] == sent["id"]
            await nothing_more(laptop, "signal")  # not to the sender
            history = await bob.request("history", room="room")
            assert [m["data"] for m in history["messages"]] == ["hello"]
        async with open_client(two.url, make_token("bob")) as back:
            joined = await back.request("join", room="room", since="0-0")
            assert joined["missed"] == 1
            assert (await back.receive())["type"] == "message"
            await nothing_more(back, "signal")


async def test_signals_have_their_own_budget_and_never_close(redis_server, nursery):
    server = await start(
        nursery, make_config(redis_server.url, limits={"signal_rate": 1, "signal_burst": 3})
    )
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            await alice.join("room")
            await bob.join("room")
            for n in range(40):
                await alice.send_frame({"type": "signal", "room": "room", "data": n, "ref": n})
            assert (await alice.ping())["type"] == "pong"  # still connected: no 4429
            errors = [frame for frame in alice._pending if frame["type"] == "error"]
            assert {frame["code"] for frame in errors} == {"rate_limited"}
            accepted = sorted(set(range(40)) - {frame["ref"] for frame in errors})
            assert 3 <= len(accepted) <= 5  # the burst, and what a second or so refilled
            received = [await next_of(bob, "signal") for _ in accepted]
            assert [frame["data"] for frame in received] == accepted
            assert (await alice.send("room", "still here"))["type"] == "ack"


async def test_signals_off_and_oversized_signals_are_refused(redis_server, nursery):
    quiet = RoomOptions(match="quiet-*", signals=False)
    server = await start(nursery, with_rooms(make_config(redis_server.url), quiet))
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            for chat in (alice, bob):
                await chat.join("quiet-1")
                await chat.join("loud")
            for room, data, code in (
                ("quiet-1", True, "forbidden"),
                ("loud", "x" * 1100, "too_large"),
                ("elsewhere", True, "not_in_room"),
            ):
                with pytest.raises(ServerError) as refused:
                    await alice.request("signal", room=room, data=data)
                assert refused.value.code == code
            await nothing_more(bob, "signal")


# --- read markers ---------------------------------------------------------------------------


async def read_markers_hash(url: str, room: str) -> dict[str, str]:
    async with open_backend(url, command_timeout=1) as backend:
        return await read_hash(backend, f"ws:read:{room}")


async def test_read_markers_move_forward_only_and_reach_the_users_other_devices(
    redis_or_cluster, nursery
):
    url = redis_or_cluster.url
    one, two = await two_instances(nursery, url)
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(one.url, make_token("alice")) as laptop,
            open_client(two.url, make_token("alice")) as phone,
            open_client(two.url, make_token("bob")) as bob,
        ):
            for chat in (laptop, phone, bob):
                joined = await chat.join("room")
                assert (joined["read"], joined["unread"]) == (None, 0)
            ids = [(await bob.send("room", n))["id"] for n in range(5)]
            for chat in (laptop, phone):
                assert [(await next_of(chat, "message"))["id"] for _ in ids] == ids
            await laptop.send_frame({"type": "read", "room": "room", "id": ids[2], "ref": "r1"})
            expected = {"type": "read", "room": "room", "user": "alice", "id": ids[2]}
            assert await next_of(phone, "read") == expected
            assert await next_of(bob, "read") == expected
            await nothing_more(laptop, "read")
            # backwards, or the same again: nothing changes, nothing is sent
            await phone.send_frame({"type": "read", "room": "room", "id": ids[1]})
            await phone.send_frame({"type": "read", "room": "room", "id": ids[2]})
            await nothing_more(bob, "read")
            assert await read_markers_hash(url, "room") == {"alice": ids[2]}
            receipts = await bob.request("receipts", room="room")
            assert receipts == {
                "type": "receipts",
                "room": "room",
                "read": {"alice": ids[2]},
                "ref": receipts["ref"],
            }
            # a newer id than the room's last message, or no message id at all
            for bad in ("99999999999999-0", "nonsense"):
                with pytest.raises(ServerError) as refused:
                    await laptop.request("read", room="room", id=bad)
                assert refused.value.code == "bad_request"
            with pytest.raises(ServerError) as refused:
                await laptop.request("receipts", room="elsewhere")
            assert refused.value.code == "not_in_room"
        # unread counts exactly what follows the marker, on a new connection
        async with open_client(two.url, make_token("alice")) as tablet:
            joined = await tablet.join("room")
            assert (joined["read"], joined["unread"]) == (ids[2], 2)
        async with open_client(one.url, make_token("carol")) as carol:
            joined = await carol.join("room")  # no marker: the whole stream is unread
            assert (joined["read"], joined["unread"]) == (None, 5)


async def test_read_markers_without_history_are_stored_as_given(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url, history={"size": 0}))
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            await alice.join("room")
            joined = await bob.join("room")
            assert (joined["read"], joined["unread"]) == (None, None)
            sent = await alice.send("room", "hi")
            await bob.send_frame({"type": "read", "room": "room", "id": sent["id"]})
            assert (await next_of(alice, "read"))["id"] == sent["id"]
            assert (await alice.join("room"))["read"] is None
            again = await bob.join("room")
            assert (again["read"], again["unread"]) == (sent["id"], None)


# --- permissions and room options -----------------------------------------------------------


async def test_the_publish_claim_limits_send_and_signal(redis_server, nursery):
    server = await start(nursery, make_config(redis_server.url))
    with trio.fail_after(TIME_LIMIT):
        async with open_client(server.url, make_token("alice", publish=["talk-*"])) as alice:
            await alice.join("talk-1")
            await alice.join("news")  # joining is the rooms claim's business
            assert (await alice.send("talk-1", "hi"))["type"] == "ack"
            for kind, fields in (("send", {"data": "hi"}), ("signal", {"data": True})):
                with pytest.raises(ServerError) as refused:
                    await alice.request(kind, room="news", **fields)
                assert refused.value.code == "forbidden"


async def test_announcement_rooms_take_only_server_messages(redis_server, nursery):
    announcements = RoomOptions(match="announce*", client_publish=False)
    config = with_rooms(make_config(redis_server.url, admin=ADMIN), announcements)
    server = await start(nursery, config)
    with trio.fail_after(TIME_LIMIT):
        async with open_client(server.url, make_token("alice")) as alice:
            await alice.join("announcements")
            with pytest.raises(ServerError) as refused:
                await alice.send("announcements", "me too")
            assert refused.value.code == "forbidden"
            async with admin_client(server) as http:
                answer = await http.post(
                    "/v1/publish", json={"room": "announcements", "data": "release 2.0"}
                )
                assert answer.status_code == 200, answer.text
            message = await next_of(alice, "message")
            assert (message["from"], message["data"]) == (None, "release 2.0")
            await server.publish("announcements", "from the app", sender="bot")
            assert (await next_of(alice, "message"))["from"] == "bot"


async def test_max_members_counts_users_not_devices(redis_server, nursery):
    small = RoomOptions(match="small", max_members=2)
    one, two = await two_instances(nursery, redis_server.url, small)
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(one.url, make_token("alice")) as alice,
            open_client(two.url, make_token("alice")) as alice_phone,
            open_client(two.url, make_token("bob")) as bob,
            open_client(one.url, make_token("carol")) as carol,
        ):
            await alice.join("small")
            await bob.join("small")
            await alice_phone.join("small")  # a second device is no new member
            with pytest.raises(ServerError) as refused:
                await carol.join("small")
            assert refused.value.code == "room_full"
            await carol.join("big")  # other rooms have no limit
            await bob.leave("small")
            await carol.join("small")


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_per_room_history(store, request, nursery):
    url = "memory://" if store == "memory" else request.getfixturevalue("redis_server").url
    short = RoomOptions(match="short", history_size=10)
    none = RoomOptions(match="none", history_size=0)
    fast = {"send_rate": 1e6, "send_burst": 1000, "frame_rate": 1e6, "frame_burst": 1000}
    server = await start(nursery, with_rooms(make_config(url, limits=fast), short, none))
    with trio.fail_after(TIME_LIMIT):
        async with open_client(server.url, make_token("alice")) as alice:
            for room, count in (("short", 150), ("none", 5), ("default", 150)):
                await alice.join(room)
                for n in range(count):
                    await alice.send(room, n)
            kept = {}
            for room in ("short", "none", "default"):
                page = await alice.request("history", room=room, limit=100)
                kept[room] = [m["data"] for m in page["messages"]]
            # no history: a marker is stored as given, and nothing counts as unread
            joined = await alice.join("none")
            assert joined["unread"] is None
    assert kept["none"] == []
    assert kept["default"] == list(range(50, 150))
    # MAXLEN ~ 10: Redis trims whole nodes of entries, so at least the last 10 stay, and
    # fewer than all (the memory backend keeps exactly 10)
    assert 10 <= len(kept["short"]) < 150
    assert kept["short"] == list(range(150 - len(kept["short"]), 150))
    if store == "memory":
        assert len(kept["short"]) == 10


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[[rooms]]\nhistory_size = 5\n", "rooms[1].match"),
        (
            '[[rooms]]\nmatch = "a"\n[[rooms]]\nmatch = "b"\nmax_members = -1\n',
            "rooms[2].max_members",
        ),
        ('[[rooms]]\nmatch = "a"\nsignal = false\n', "rooms[1].signal"),
        ('[[rooms]]\nmatch = "a"\npresence_events = "yes"\n', "rooms[1].presence_events"),
        ('[[rooms]]\nmatch = "a"\nhistory_ttl = 0\n', "rooms[1].history_ttl"),
        ('[rooms]\nmatch = "a"\n', "rooms"),
    ],
)
def test_a_bad_rooms_table_refuses_to_start_naming_the_key(tmp_path: Path, toml: str, key: str):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = subprocess.run(
        [sys.executable, "-m", "trio_chat", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"TRIO_CHAT_AUTH_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"trio-chat: config error: {key}: ")
    assert "Traceback" not in result.stderr


# --- the operators' room list ---------------------------------------------------------------


async def test_the_room_list_counts_users_and_survives_a_redis_restart(redis_server, nursery):
    config = make_config(redis_server.url, admin=ADMIN, session={"ttl": 1.5})
    server = await start(nursery, config)
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("alice")) as alice_phone,
            open_client(server.url, make_token("bob")) as bob,
            admin_client(server) as http,
        ):
            for chat in (alice, alice_phone, bob):
                await chat.join("big")
            await bob.join("small")
            expected = {"rooms": [{"room": "big", "users": 2}, {"room": "small", "users": 1}]}
            assert (await http.get("/v1/rooms")).json() == expected
            assert (await http.get("/v1/rooms?limit=1")).json() == {"rooms": expected["rooms"][:1]}
            assert await server.rooms() == expected["rooms"]
            for bad in ("0", "1001", "x"):
                answer = await http.get(f"/v1/rooms?limit={bad}")
                assert answer.status_code == 400
                assert answer.json()["error"] == "bad_request"
            await bob.leave("small")
            assert (await http.get("/v1/rooms")).json() == {"rooms": [{"room": "big", "users": 2}]}
            # Redis restarts empty: the heartbeat writes the sessions back, and the index
            redis_server.restart()
            while (await http.get("/v1/rooms")).json() != {"rooms": [{"room": "big", "users": 2}]}:
                await trio.sleep(0.1)
            presence = await bob.request("presence", room="big")
            assert sorted((u["user"], u["sessions"]) for u in presence["users"]) == [
                ("alice", 2),
                ("bob", 1),
            ]


class _Member:
    """What the pump needs of a session: an id, whether its queue is congested, deliver()."""

    def __init__(self, session_id: str, *, congested: bool) -> None:
        self.id = session_id
        self.congested = congested
        self.frames: list[dict[str, Any]] = []

    def deliver(self, frame: bytes, cork: object = None) -> bool:
        self.frames.append(json.loads(frame[frame.index(b"{") :]))
        return True


async def test_a_congested_member_loses_signals_first_but_not_the_rest():
    from trio_chat._hub import Hub
    from trio_chat._rooms import presence_join, read
    from trio_chat._rooms import signal as room_signal
    from trio_chat._store.memory import MemoryBackend

    hub = Hub(Config(), MemoryBackend())
    sender = _Member("s-sender", congested=False)
    easy = _Member("s-easy", congested=False)
    busy = _Member("s-busy", congested=True)
    hub._by_room["r"] = {sender, easy, busy}  # type: ignore[assignment]
    for payload in (
        room_signal("r", "alice", "s-sender", {"typing": True}),
        read("r", "alice", "s-sender", "1-0"),
        presence_join("r", "bob", "s-other", None),
    ):
        hub._dispatch("chat:room:r", payload)
    hub._cork.flush()
    kinds = {
        member.id: [frame["type"] for frame in member.frames] for member in (sender, easy, busy)
    }
    assert kinds == {
        "s-sender": ["presence_join"],  # nothing of its own comes back
        "s-easy": ["signal", "read", "presence_join"],
        "s-busy": ["read", "presence_join"],  # the signal was dropped
    }
    assert easy.frames[0] == {
        "type": "signal",
        "room": "r",
        "from": "alice",
        "data": {"typing": True},
    }
    assert hub.metrics.registry.get_sample_value("trio_chat_signals_dropped_total") == 1


async def test_a_leave_redis_missed_is_settled_unless_the_session_came_back(redis_server, nursery):
    # A leave while Redis is paused is answered (the client left), and the heartbeat makes
    # Redis agree later, but not for a session that has joined the room again meanwhile:
    # it must not be announced gone, nor counted twice.
    # (a TTL well above the pause, two command timeouts: the keys outlive it, whenever the
    # heartbeat that failed in it comes back)
    config = with_rooms(make_config(redis_server.url, session={"ttl": 3.0}), EVENTS)
    server = await start(nursery, config)
    with trio.fail_after(TIME_LIMIT):
        async with (
            open_client(server.url, make_token("carol")) as carol,
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            for chat in (carol, alice, bob):
                await chat.join("room")
            redis_server.pause()
            try:
                assert (await alice.leave("room"))["type"] == "left"
                assert (await bob.leave("room"))["type"] == "left"
            finally:
                redis_server.resume()
            await alice.join("room")  # alice comes back; bob does not
            await trio.sleep(2.5)  # heartbeats settle what the leaves left undone
            presence = await carol.request("presence", room="room")  # (after every event)
            events = [
                (frame["type"], frame["user"])
                for frame in carol._pending
                if frame["type"].startswith("presence_")
            ]
            async with open_backend(redis_server.url, command_timeout=1) as backend:
                counted = await read_hash(backend, "ws:room:room:users")
    assert sorted((u["user"], u["sessions"]) for u in presence["users"]) == [
        ("alice", 1),
        ("carol", 1),
    ]
    assert events.count(("presence_leave", "bob")) == 1
    # alice was never announced gone for good: her last event, if any, is a join
    mine = [kind for kind, user in events if user == "alice"]
    assert mine in (["presence_join"], ["presence_join", "presence_leave", "presence_join"], [])
    assert counted == {"alice": "1", "carol": "1"}
