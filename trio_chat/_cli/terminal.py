"""``trio-chat client``: an interactive terminal client on :mod:`trio_chat.client`.

Lines typed are commands (``/join ROOM``, ``/leave ROOM``, ``/room ROOM``, ``/history``,
``/direct USER TEXT``, ``/ping``, ``/quit``) or text sent to the current room; frames from the
server are printed one per line as they arrive. ``/join`` shows the room's last messages, and
``/history`` the ones before the earliest shown. End of input closes the connection.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

import trio

from ..client import ChatClient, ConnectionClosed, open_client

HELP = "commands: /join ROOM  /leave ROOM  /room ROOM  /history  /direct USER TEXT  /ping  /quit"
#: messages shown on /join, and per /history
JOIN_PAGE, HISTORY_PAGE = 10, 20


def describe(frame: dict[str, object]) -> str:
    """One readable line for a server frame."""
    data = frame.get("data")
    text = data if isinstance(data, str) else json.dumps(data)
    match frame.get("type"):
        case "message":
            return f"[{frame['room']}] {frame['from'] or '(admin)'}: {text}"
        case "direct":
            return f"(direct) {frame['from']}: {text}"
        case "joined" | "left" as kind:
            return f"* {kind} {frame['room']}"
        case "error":
            return f"! {frame['code']}: {frame['message']}"
        case "welcome":
            return f"* connected as {frame['user_id']} (session {frame['session_id']})"
        case "logout":
            return f"* logged out: {frame['reason']}"
        case "history":
            messages: list[dict[str, object]] = frame["messages"]  # type: ignore[assignment]
            if not messages:
                return f"* [{frame['room']}] no earlier messages"
            return "\n".join(describe({"type": "message", **m}) for m in messages)
    return f"* {json.dumps(frame)}"


async def run_client(url: str, token: str, *, out: TextIO = sys.stdout) -> int:
    """Chat on ``url`` with ``token`` until ``/quit``, end of input, or the server closes.

    Returns the process exit status: 0, or 1 when the server closed the connection itself.
    """
    earliest: dict[str, str] = {}  # room -> the earliest message id shown, for /history
    async with open_client(url, token) as chat:
        print(describe(chat.welcome), HELP, sep="\n", file=out, flush=True)
        async with trio.open_nursery() as nursery:
            closed_by_server = trio.Event()
            nursery.start_soon(
                _print_frames, chat, out, earliest, closed_by_server, nursery.cancel_scope
            )
            await _read_commands(chat, out, earliest)
            nursery.cancel_scope.cancel()
    return 1 if closed_by_server.is_set() else 0


async def _print_frames(
    chat: ChatClient,
    out: TextIO,
    earliest: dict[str, str],
    closed: trio.Event,
    scope: trio.CancelScope,
) -> None:
    try:
        while True:
            frame = await chat.receive()
            if frame.get("type") == "history" and frame["messages"]:
                earliest[frame["room"]] = frame["messages"][0]["id"]
            if frame.get("type") != "ack":  # the message itself is what others see
                print(describe(frame), file=out, flush=True)
    except ConnectionClosed as exc:
        reason = exc.reason
        print(f"* closed: {reason.code if reason else '?'}", file=out, flush=True)
        closed.set()
        scope.cancel()


async def _read_commands(chat: ChatClient, out: TextIO, earliest: dict[str, str]) -> None:
    room: str | None = None
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        buffer = b""
        while chunk := await stdin.receive_some():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                if line == "/quit":
                    return
                room = await _command(chat, line, room, out, earliest)


async def _command(
    chat: ChatClient, line: str, room: str | None, out: TextIO, earliest: dict[str, str]
) -> str | None:
    """Send what ``line`` asks for (replies are printed by the reader); return the room."""
    verb, _, rest = line.partition(" ")
    match verb:
        case "":
            pass
        case "/join":
            await chat.send_frame({"type": "join", "room": rest})
            await chat.send_frame({"type": "history", "room": rest, "limit": JOIN_PAGE})
            room = rest
        case "/history" if room is not None:
            page = {"type": "history", "room": room, "limit": HISTORY_PAGE}
            if room in earliest:
                page["before"] = earliest[room]
            await chat.send_frame(page)
        case "/leave":
            await chat.send_frame({"type": "leave", "room": rest})
        case "/room":
            room = rest
        case "/direct":
            to, _, text = rest.partition(" ")
            await chat.send_frame({"type": "direct", "to": to, "data": text})
        case "/ping":
            await chat.send_frame({"type": "ping"})
        case _ if verb.startswith("/"):
            print(HELP, file=out, flush=True)
        case _ if room is None:
            print("! join a room first: /join ROOM", file=out, flush=True)
        case _:
            await chat.send_frame({"type": "send", "room": room, "data": line})
    return room
