"""The floor under workload D: what trio + trio-websocket alone cost per connection.

A bare trio-websocket server that speaks just enough of trio-chat's protocol for the load
generator's trio client: it accepts every upgrade, writes ``welcome``, and answers each
``join`` with ``joined``; no Redis, no token check (``--jwt`` adds PyJWT's HS256 check of the
bearer token, as trio-chat does; ``--forget`` drops the handshake's leftovers once the socket
is open, as trio-chat does, with ``trio_chat._wire.forget_handshake``). Run workload D (or C)
of ``bench/loadgen/loadgen.mjs`` against it:

  .venv/bin/python bench/floor.py [--jwt] [--forget]   # prints "floor listening on ws://..."
  node bench/loadgen/loadgen.mjs --system trio --workload connect --urls URL,URL \\
      --secret "$(python3 -c 'import run; print(run.SECRET)')" --pids PID --connections 2000 \\
      --concurrency 100

It is no chat server: it is how fast trio-chat could open and join at best without leaving
trio-websocket, the design we were asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import jwt
import trio
from run import SECRET  # bench/run.py: the secret the generator signs its tokens with
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from trio_chat._wire import forget_handshake


async def handler(check_jwt: bool, forget: bool, request: WebSocketRequest) -> None:
    if check_jwt:
        header = dict(request.headers).get(b"authorization", b"").decode()
        jwt.decode(header.removeprefix("Bearer "), SECRET, algorithms=["HS256"])
    ws = await request.accept()
    if forget:
        forget_handshake(request)
    await ws.send_message(json.dumps({"type": "welcome", "session_id": "s"}))
    try:
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("type") == "join":
                reply = {"type": "joined", "ref": frame.get("ref"), "room": frame.get("room")}
                await ws.send_message(json.dumps(reply))
    except ConnectionClosed:
        pass


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--jwt", action="store_true", help="verify the bearer token (HS256)")
    parser.add_argument("--forget", action="store_true", help="forget_handshake() each socket")
    args = parser.parse_args()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                serve_websocket,
                partial(handler, args.jwt, args.forget),
                "127.0.0.1",
                args.port,
                None,
            )
        )
        port = server.port
        print(f"floor listening on ws://127.0.0.1:{port}/ws", file=sys.stderr, flush=True)


if __name__ == "__main__":
    trio.run(main)
