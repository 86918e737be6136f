"""Embedding trio-chat in your own Trio application.

Run:  .venv/bin/python examples/embed.py

It starts an instance on the in-memory store and an ephemeral port, beside the application's
own tasks, lets two clients talk through it, then shuts everything down by cancelling the
nursery. Against Redis, set ``redis=RedisConfig(url="redis://...")``.
"""

from __future__ import annotations

import time

import attrs
import jwt
import trio

import trio_chat
from trio_chat.client import open_client

SECRET = "example-secret-" + "x" * 32


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


async def main() -> None:
    config = attrs.evolve(
        trio_chat.Config(),
        server=trio_chat.ServerConfig(port=0, instance_id="embedded-1"),
        auth=trio_chat.AuthConfig(jwt_secret=SECRET),
    )
    async with trio.open_nursery() as nursery:
        # Returns once the listener is bound; `server.url` has the ephemeral port.
        server = await nursery.start(trio_chat.serve, config)
        print(f"chat server at {server.url} (instance {server.instance_id})")

        async with open_client(server.url, token("alice")) as alice:
            async with open_client(server.url, token("bob")) as bob:
                await alice.join("lobby")
                await bob.join("lobby")
                await alice.send("lobby", {"text": "hello from the embedding app"})
                message = await bob.receive()
                print(f"bob got: {message['data']['text']!r} from {message['from']}")

        # Shutting down is cancelling: the instance removes its records on the way out.
        nursery.cancel_scope.cancel()
    print("stopped cleanly")


if __name__ == "__main__":
    trio.run(main)
