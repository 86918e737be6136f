"""The python-socketio peer for bench/run.py: trio-chat's room semantics on Socket.IO.

An ASGI app for uvicorn: ``socketio.AsyncServer`` with ``AsyncRedisManager``, so that a
message sent through one instance reaches the room's members on every instance.

- connect: the client passes ``auth={"token": JWT}``; the HS256 token is verified with pyjwt
  (``sub``, ``iat``, ``exp`` required, secret from ``TRIO_CHAT_AUTH_JWT_SECRET``), else the
  connection is refused (``connect_error invalid_token``).
- ``join`` ``{"room": R}`` -> ack ``{"type": "joined", "room": R}``.
- ``send`` ``{"room": R, "data": D}`` -> "message" ``{"id","room","from","data","ts"}`` to R on
  every instance, except the sender's own sid (``skip_sid``); ack ``{"type":"ack","id","ts"}``.
  Sending to a room the sid has not joined acks ``{"type":"error","code":"not_in_room"}``.

Unlike trio-chat it writes no session records to Redis: its only Redis traffic is the
manager's Pub/Sub (one channel, ``socketio``, that every instance receives in full).

Run: TRIO_CHAT_AUTH_JWT_SECRET=... BENCH_REDIS_URL=redis://127.0.0.1:PORT/0 \
     uvicorn --app-dir bench/peers socketio_server:app --port P --ws-per-message-deflate false
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import jwt
import socketio

SECRET = os.environ["TRIO_CHAT_AUTH_JWT_SECRET"]
REDIS_URL = os.environ["BENCH_REDIS_URL"]

manager = socketio.AsyncRedisManager(REDIS_URL)
sio = socketio.AsyncServer(
    async_mode="asgi",
    client_manager=manager,
    cors_allowed_origins=[],  # no browsers here; clients without Origin pass
    logger=False,
    engineio_logger=False,
)
app = socketio.ASGIApp(sio)


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
    token = auth.get("token") if isinstance(auth, dict) else None
    if not token:
        raise socketio.exceptions.ConnectionRefusedError("missing_token")
    try:
        claims = jwt.decode(
            token, SECRET, algorithms=["HS256"], options={"require": ["sub", "iat", "exp"]}
        )
    except jwt.PyJWTError as exc:
        raise socketio.exceptions.ConnectionRefusedError("invalid_token") from exc
    await sio.save_session(sid, {"user": str(claims["sub"])})


@sio.event
async def join(sid: str, data: Any) -> dict[str, Any]:
    room = data.get("room") if isinstance(data, dict) else None
    if not isinstance(room, str) or not room:
        return {"type": "error", "code": "bad_request"}
    await sio.enter_room(sid, room)
    return {"type": "joined", "room": room}


@sio.event
async def send(sid: str, data: Any) -> dict[str, Any]:
    room = data.get("room") if isinstance(data, dict) else None
    if not isinstance(room, str) or room not in sio.rooms(sid):
        return {"type": "error", "code": "not_in_room"}
    session = await sio.get_session(sid)
    message_id = uuid.uuid4().hex
    ts = int(time.time() * 1000)
    message = {
        "id": message_id,
        "room": room,
        "from": session["user"],
        "data": data.get("data"),
        "ts": ts,
    }
    await sio.emit("message", message, room=room, skip_sid=sid)
    return {"type": "ack", "id": message_id, "ts": ts}
