"""Application hooks in Python and the embedding API (SPEC §14), on instances in this process.

The HTTP transport, with real ``trio-chat serve`` processes and a real application, is
tests/test_hooks_http.py.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import pytest
import trio
import trio.lowlevel
from _chat import ADMIN, admin_client, make_config, make_token
from test_recovery import redis_command
from trio_websocket import ConnectionRejected

import trio_chat
from trio_chat import Allow, Deny
from trio_chat.client import ServerError, open_client


class Recorder:
    """Hooks that answer from a table of rules and record every event they are asked."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.events: list[Any] = []
        self.disconnected = trio.Event()

    async def _answer(self, name: str, event: Any) -> Any:
        self.events.append(event)
        answer = self.answers.get(name, Allow())
        return answer(event) if callable(answer) else answer

    async def connect(self, event: trio_chat.ConnectEvent) -> Any:
        return await self._answer("connect", event)

    async def join(self, event: trio_chat.JoinEvent) -> Any:
        return await self._answer("join", event)

    async def send(self, event: trio_chat.SendEvent) -> Any:
        return await self._answer("send", event)

    async def direct(self, event: trio_chat.DirectEvent) -> Any:
        return await self._answer("direct", event)

    async def disconnect(self, event: trio_chat.DisconnectEvent) -> None:
        self.events.append(event)
        self.disconnected.set()


async def start(nursery: trio.Nursery, rules: object, **sections: Any) -> trio_chat.Server:
    config = make_config(**sections)
    server: trio_chat.Server = await nursery.start(partial(trio_chat.serve, hooks=rules), config)
    return server


def of(recorder: Recorder, kind: type) -> list[Any]:
    return [e for e in recorder.events if isinstance(e, kind)]


async def test_connect_allows_with_info_and_rooms_or_denies(nursery):
    def connect(event: trio_chat.ConnectEvent) -> Any:
        if event.user == "mallory":
            return Deny("not today")
        return Allow(info={"name": event.user.title()}, rooms=["lobby", "bad room!", "news"])

    hooks = Recorder(connect=connect)
    server = await start(nursery, hooks)
    with trio.fail_after(10):
        with pytest.raises(ConnectionRejected) as refused:
            async with open_client(server.url, make_token("mallory")):
                pass
        assert refused.value.status_code == 403
        assert b'"error": "forbidden"' in refused.value.body
        assert b"not today" in refused.value.body
        async with open_client(server.url, make_token("alice", role="x")) as alice:
            assert alice.welcome["info"] == {"name": "Alice"}
            frames = [await alice.receive() for _ in range(3)]
            assert frames[0] == {
                "type": "joined",
                "room": "lobby",
                "last": None,
                "read": None,
                "unread": 0,
            }
            assert frames[1]["type"] == "error"
            assert frames[1]["code"] == "bad_request"
            assert "ref" not in frames[1]
            assert frames[2] == {
                "type": "joined",
                "room": "news",
                "last": None,
                "read": None,
                "unread": 0,
            }
            # auto-joined: a send there works, and the join hook was not asked
            assert (await alice.send("lobby", {"text": "hi"}))["type"] == "ack"
            # presence shows what the connect hook said of the session
            [present] = (await server.presence("lobby"))["sessions"]
            assert (present["user_id"], present["info"]) == ("alice", {"name": "Alice"})
        connects = of(hooks, trio_chat.ConnectEvent)
        assert [e.user for e in connects] == ["mallory", "alice"]
        assert connects[1].claims["role"] == "x"
        assert connects[1].instance == server.instance_id
        assert of(hooks, trio_chat.JoinEvent) == []
        await hooks.disconnected.wait()
    [gone] = of(hooks, trio_chat.DisconnectEvent)
    assert gone.user == "alice"
    assert gone.reason == "closed"
    assert gone.rooms == ("lobby", "news")


async def test_join_send_and_direct_allow_deny_and_change(nursery):
    def join(event: trio_chat.JoinEvent) -> Any:
        if event.room == "secret":
            return Deny("members only")
        return Allow(publish=event.room != "announcements")

    def send(event: trio_chat.SendEvent) -> Any:
        if event.data == "forbidden words":
            return Deny("mind your language")
        if event.data == "replace me":
            return Allow(data={"text": "replaced"})
        if event.data == "to null":
            return Allow(data=None)
        return Allow()

    def direct(event: trio_chat.DirectEvent) -> Any:
        return (
            Deny("no directs to bots") if event.to == "bot" else Allow(data={"wrapped": event.data})
        )

    hooks = Recorder(join=join, send=send, direct=direct)
    server = await start(nursery, hooks)
    with trio.fail_after(10):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            assert alice.welcome["info"] is None  # no connect hook: null
            with pytest.raises(ServerError) as refused:
                await alice.join("secret")
            assert (refused.value.code, refused.value.frame["message"]) == (
                "forbidden",
                "members only",
            )
            await alice.join("announcements")
            with pytest.raises(ServerError) as refused:
                await alice.send("announcements", "hello")
            assert refused.value.code == "forbidden"
            await alice.leave("announcements")

            await alice.join("lobby")
            await bob.join("lobby")
            [joined] = [e for e in of(hooks, trio_chat.JoinEvent) if e.user == "bob"]
            assert (joined.room, joined.info, joined.session) == (
                "lobby",
                None,
                bob.welcome["session_id"],
            )
            with pytest.raises(ServerError) as refused:
                await alice.send("lobby", "forbidden words")
            assert refused.value.frame["message"] == "mind your language"
            await alice.send("lobby", "replace me")
            await alice.send("lobby", "to null")
            await alice.send("lobby", "as is")
            got = [(await bob.receive())["data"] for _ in range(3)]
            assert got == [{"text": "replaced"}, None, "as is"]

            with pytest.raises(ServerError) as refused:
                await alice.direct("bot", "hi")
            assert refused.value.frame["message"] == "no directs to bots"
            await alice.direct("bob", "psst")
            got = await bob.receive()
            assert (got["type"], got["from"], got["data"]) == (
                "direct",
                "alice",
                {"wrapped": "psst"},
            )
            history = await server.history("lobby")
            assert [m["data"] for m in history["messages"]] == [{"text": "replaced"}, None, "as is"]


async def test_a_hook_that_raises_hangs_or_answers_nonsense_fails_closed(nursery):
    def send(event: trio_chat.SendEvent) -> Any:
        match event.data:
            case "raise":
                raise RuntimeError("bug in the application")
            case "nonsense":
                return {"allow": True}  # not an Allow
            case "not json":
                return Allow(data={1, 2})
        return Allow()

    class Hooks(Recorder):
        async def send(self, event: trio_chat.SendEvent) -> Any:
            if event.data == "hang":
                await trio.sleep_forever()
            return await super().send(event)

        async def connect(self, event: trio_chat.ConnectEvent) -> Any:
            if event.user == "crash":
                raise ValueError("boom")
            if event.user == "big":
                return Allow(info={"name": "x" * 2000})
            return Allow()

    hooks = Hooks(send=send)
    server = await start(nursery, hooks, hooks={"timeout": 0.3}, history={"size": 100}, admin=ADMIN)
    with trio.fail_after(15):
        for user in ("crash", "big"):
            with pytest.raises(ConnectionRejected) as refused:
                async with open_client(server.url, make_token(user)):
                    pass
            assert refused.value.status_code == 503
            assert b'"error": "hooks_unavailable"' in refused.value.body
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            await alice.join("lobby")
            await bob.join("lobby")
            for data in ("raise", "hang", "nonsense", "not json"):
                with pytest.raises(ServerError) as refused:
                    await alice.send("lobby", data)
                assert refused.value.code == "unavailable", data
            # nothing of it was published or stored; the session and the instance go on
            assert (await server.history("lobby"))["messages"] == []
            await alice.send("lobby", "fine")
            assert (await bob.receive())["data"] == "fine"
            assert (await alice.ping())["type"] == "pong"
        async with admin_client(server) as http:
            metrics = (await http.get("/metrics")).text
    assert 'trio_chat_hook_calls_total{hook="send",result="error"} 4.0' in metrics
    assert 'trio_chat_hook_calls_total{hook="send",result="allow"} 1.0' in metrics
    assert 'trio_chat_hook_calls_total{hook="connect",result="error"} 2.0' in metrics
    assert 'trio_chat_hook_seconds_count{hook="send"} 5.0' in metrics


async def test_a_senders_messages_keep_their_order_through_a_slow_hook(nursery):
    async def send(event: trio_chat.SendEvent) -> Allow:
        await trio.sleep(random.uniform(0, 0.02))
        return Allow(data={"n": event.data, "checked": True})

    class Hooks:
        pass

    hooks = Hooks()
    hooks.send = send  # type: ignore[attr-defined]
    server = await start(nursery, hooks, limits={"send_rate": 1000, "send_burst": 1000})
    with trio.fail_after(30):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            open_client(server.url, make_token("bob")) as bob,
        ):
            await alice.join("lobby")
            await bob.join("lobby")
            async with trio.open_nursery() as senders:
                # all 200 frames at once, without waiting for acks
                for n in range(200):
                    senders.start_soon(alice.send, "lobby", n)
                    await trio.lowlevel.checkpoint()
            got = [(await bob.receive())["data"] for _ in range(200)]
    sent_order = [item["n"] for item in got]
    assert sent_order == sorted(sent_order)
    assert len(set(sent_order)) == 200
    assert all(item["checked"] for item in got)


async def test_a_slow_hook_does_not_cost_the_client_its_heartbeat(nursery):
    class Slow:
        async def send(self, event: trio_chat.SendEvent) -> Allow:
            await trio.sleep(0.8)
            return Allow()

    server = await start(
        nursery,
        Slow(),
        hooks={"timeout": 2},
        heartbeat={"ping_interval": 0.2, "ping_timeout": 0.2},
    )
    with trio.fail_after(15):
        async with open_client(server.url, make_token("alice")) as alice:
            await alice.join("lobby")
            async with trio.open_nursery() as senders:
                for n in range(4):  # 3.2 s of hooks, 16 ping timeouts
                    senders.start_soon(alice.send, "lobby", n)
            assert (await alice.ping())["type"] == "pong"


async def test_hooks_and_hooks_url_together_is_a_config_error(nursery):
    with pytest.raises(trio_chat.ConfigError, match=r"hooks\.url"):
        await start(nursery, Recorder(), hooks={"url": "http://127.0.0.1:1/", "secret": "s"})
    with pytest.raises(trio_chat.ConfigError, match="none of the methods"):
        await start(nursery, object())


async def test_listen_sees_every_message_once_across_a_pubsub_drop(redis_server, nursery):
    server = await start(nursery, None, redis_url=redis_server.url, history={"size": 1000})
    other = await start(
        nursery,
        None,
        redis_url=redis_server.url,
        instance_id="test-2",
        limits={"send_rate": 1000, "send_burst": 1000},
    )
    seen: list[dict[str, Any]] = []
    with trio.fail_after(30):
        async with server.listen("lobby") as messages:
            async with open_client(other.url, make_token("alice")) as alice:
                await alice.join("lobby")
                acked = []
                for n in range(150):
                    acked.append((await alice.send("lobby", {"n": n}))["id"])
                    if n in (40, 90):
                        await redis_command(redis_server.port, "CLIENT", "KILL", "TYPE", "pubsub")
                acked.append(await server.publish("lobby", {"n": "bot"}, sender="dice-bot"))
            async for message in messages:
                seen.append(message)
                if len(seen) == len(acked):
                    break
    assert [m["id"] for m in seen] == acked
    assert seen[0]["room"] == "lobby"
    assert seen[0]["from"] == "alice"
    assert seen[-1]["from"] == "dice-bot"
    assert seen[-1]["type"] == "message"


async def test_embedding_api_and_admin_api_share_the_operations(redis_server, nursery):
    server = await start(nursery, None, redis_url=redis_server.url, admin=ADMIN)
    with trio.fail_after(15):
        async with (
            open_client(server.url, make_token("alice")) as alice,
            admin_client(server) as http,
        ):
            await alice.join("lobby")
            message_id = await server.publish("lobby", {"text": "from the app"})
            got = await alice.receive()
            assert (got["id"], got["from"]) == (message_id, None)
            await server.publish("lobby", "beep", sender="dice-bot")
            assert (await alice.receive())["from"] == "dice-bot"
            answer = await http.post(
                "/v1/publish", json={"room": "lobby", "data": 1, "from": "ops"}
            )
            assert answer.status_code == 200
            got = await alice.receive()
            assert (got["id"], got["from"], got["data"]) == (answer.json()["id"], "ops", 1)
            bad = await http.post("/v1/publish", json={"room": "lobby", "data": 1, "from": 7})
            assert (bad.status_code, bad.json()["error"]) == (422, "invalid_field")

            direct_id = await server.direct("alice", {"hi": 1}, sender="dice-bot")
            got = await alice.receive()
            assert (got["type"], got["id"], got["from"]) == ("direct", direct_id, "dice-bot")
            answer = await http.post("/v1/users/alice/direct", json={"data": 2})
            assert answer.status_code == 200
            got = await alice.receive()
            assert (got["type"], got["from"], got["data"]) == ("direct", None, 2)

            [session] = await server.sessions("alice")
            assert session["session_id"] == alice.welcome["session_id"]
            presence = await server.presence("lobby")
            assert presence["users"] == ["alice"]
            assert [i["instance_id"] for i in await server.instances()] == [server.instance_id]
            assert len((await server.history("lobby", limit=2))["messages"]) == 2
            assert await server.mute("alice", 60) > 0
            with pytest.raises(ServerError, match="muted"):
                await alice.send("lobby", "x")
            await server.unban("alice")
            assert await server.kick("no-such-session") is None
            assert await server.logout("alice") == 1
        with pytest.raises(ValueError, match="room"):
            await server.publish("bad room!", 1)
        with pytest.raises(ValueError, match="from"):
            await server.publish("lobby", 1, sender="")
