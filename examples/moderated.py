"""An embedded trio-chat whose rules are the application's: Python hooks and a bot.

Run:  .venv/bin/python examples/moderated.py

- a ``join`` hook backed by a membership table: private rooms admit their members only;
- a ``send`` hook that masks a word list (the message goes out changed, ack and all);
- a bot on ``server.listen``: it answers ``/roll`` in a room as user ``dice-bot``.

It starts the instance on the in-memory store and an ephemeral port, lets alice, bob and carol
try it, prints what each sees, and shuts down by cancelling the nursery. Everything it uses is
imported from ``trio_chat`` itself.
"""

from __future__ import annotations

import random
import re
import time
from functools import partial

import jwt
import trio

import trio_chat
from trio_chat.client import ServerError, open_client

SECRET = "example-secret-" + "x" * 32
#: private rooms and their members; any other room is open
MEMBERS = {"team-a": {"alice", "bob"}}
MASKED = re.compile(r"\b(darn|heck)\b", re.IGNORECASE)
BOT = "dice-bot"


class Rules:
    """The application's hooks: any of connect, join, send, direct, disconnect."""

    async def join(self, event: trio_chat.JoinEvent) -> trio_chat.Allow | trio_chat.Deny:
        members = MEMBERS.get(event.room)
        if members is not None and event.user not in members:
            return trio_chat.Deny(f"{event.room} is for its members")
        return trio_chat.Allow()

    async def send(self, event: trio_chat.SendEvent) -> trio_chat.Allow | trio_chat.Deny:
        data = event.data
        if isinstance(data, dict) and isinstance(data.get("text"), str):
            text = MASKED.sub(lambda m: "*" * len(m[0]), data["text"])
            return trio_chat.Allow(data={**data, "text": text})
        return trio_chat.Allow()


async def dice_bot(server: trio_chat.Server, room: str, *, task_status: trio.TaskStatus) -> None:
    """Answer ``/roll`` in ``room`` with a die roll, as user ``dice-bot``."""
    async with server.listen(room) as messages:
        task_status.started()
        async for message in messages:
            data = message["data"]
            if message["from"] != BOT and isinstance(data, dict) and data.get("text") == "/roll":
                roll = random.randint(1, 6)
                await server.publish(room, {"text": f"{message['from']} rolled {roll}"}, sender=BOT)


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


async def main() -> None:
    config = trio_chat.Config(
        server=trio_chat.ServerConfig(port=0, instance_id="moderated-1"),
        auth=trio_chat.AuthConfig(jwt_secret=SECRET),
        admin=trio_chat.AdminConfig(enabled=False),
    )
    async with trio.open_nursery() as nursery:
        # nursery.start() passes no keyword arguments: partial() carries hooks=
        server = await nursery.start(partial(trio_chat.serve, hooks=Rules()), config)
        await nursery.start(dice_bot, server, "team-a")

        async with (
            open_client(server.url, token("alice")) as alice,
            open_client(server.url, token("bob")) as bob,
            open_client(server.url, token("carol")) as carol,
        ):
            await alice.join("team-a")
            await bob.join("team-a")
            try:
                await carol.join("team-a")
            except ServerError as refused:
                print(f"carol was refused: {refused}")

            await alice.send("team-a", {"text": "well, darn"})
            got = await bob.receive()
            print(f"bob got from {got['from']}: {got['data']['text']}")

            await alice.send("team-a", {"text": "/roll"})
            for _ in range(2):  # alice's /roll, then the bot's answer
                got = await bob.receive()
                print(f"bob got from {got['from']}: {got['data']['text']}")
        nursery.cancel_scope.cancel()
    print("stopped cleanly")


if __name__ == "__main__":
    trio.run(main)
