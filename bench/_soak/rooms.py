"""SPEC §15's keys, read straight from Redis (every master of a cluster) and held against what
the clients know: presence per user (``ws:room:<room>:users``), the rooms index (``ws:rooms``),
the reaper's room lists (``ws:instance:<id>:rooms``) and the read markers (``ws:read:<room>``).

- :func:`presence_mismatches`, while the clients are connected and idle: each room's users hash
  must count, per user, the sessions of that user that are joined there; ``ws:rooms`` must give
  each room its number of users (and hold no other room); each live instance's room lists must
  name exactly its sessions and their rooms (a dead instance's must be gone: reaped).
- :func:`room_keys_left`, once every client is gone and every instance stopped: none of the
  three left.
- :func:`bad_read_markers`: every marker names a message of its room, one its user's clients
  sent in a ``read`` there, and its hash has a TTL.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from typing import TYPE_CHECKING, Any

from .common import format_id, parse_id

if TYPE_CHECKING:
    from .clients import Client
    from .ledger import Ledger

ROOMS_INDEX = "ws:rooms"


class ReplyError(Exception):
    pass


def _encode(args: tuple[str | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _reply(stream: Any) -> Any:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed in the middle of a reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return ReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        return None if length < 0 else stream.read(length + 2)[:-2].decode()
    if kind == b"*":
        length = int(rest)
        return None if length < 0 else [_reply(stream) for _ in range(length)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")


class Snapshot:
    """The §15 keys of every node given, as :func:`snapshot` found them."""

    def __init__(self) -> None:
        self.users: dict[str, dict[str, int]] = {}  # room -> user -> sessions
        self.users_ttl: dict[str, int] = {}  # room -> PTTL of its users hash
        self.index: dict[str, float] = {}  # ws:rooms: room -> users
        self.instance_rooms: dict[str, dict[str, Any]] = {}  # instance -> session -> rooms
        self.read: dict[str, dict[str, str]] = {}  # room -> user -> message id
        self.read_ttl: dict[str, int] = {}  # room -> PTTL of its markers


def snapshot(nodes: list[tuple[str, int]]) -> Snapshot:
    """Read the §15 keys of ``nodes`` (blocking: run it in a thread). A cluster's keys are on
    several masters: each is read where SCAN found it."""
    found = Snapshot()
    for host, port in nodes:
        with socket.create_connection((host, port), timeout=5) as sock, sock.makefile("rb") as rd:

            def call(*args: str | int, sock: socket.socket = sock, rd: Any = rd) -> Any:
                sock.sendall(_encode(args))
                reply = _reply(rd)
                if isinstance(reply, ReplyError):
                    raise reply
                return reply

            cursor = "0"
            names: list[str] = []
            while True:
                cursor, batch = call("SCAN", cursor, "MATCH", "ws:*", "COUNT", 1000)
                names += batch
                if cursor == "0":
                    break
            for name in sorted(set(names)):
                if name == ROOMS_INDEX:
                    flat = call("ZRANGE", name, 0, -1, "WITHSCORES")
                    found.index.update(zip(flat[::2], map(float, flat[1::2]), strict=True))
                elif name.startswith("ws:room:") and name.endswith(":users"):
                    room = name[len("ws:room:") : -len(":users")]
                    flat = call("HGETALL", name)
                    found.users[room] = dict(zip(flat[::2], map(int, flat[1::2]), strict=True))
                    found.users_ttl[room] = call("PTTL", name)
                elif name.startswith("ws:instance:") and name.endswith(":rooms"):
                    instance = name[len("ws:instance:") : -len(":rooms")]
                    flat = call("HGETALL", name)
                    found.instance_rooms[instance] = {
                        sid: _json(text) for sid, text in zip(flat[::2], flat[1::2], strict=True)
                    }
                elif name.startswith("ws:read:"):
                    room = name[len("ws:read:") :]
                    flat = call("HGETALL", name)
                    found.read[room] = dict(zip(flat[::2], flat[1::2], strict=True))
                    found.read_ttl[room] = call("PTTL", name)
    return found


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def expected_presence(
    clients: list[Client],
) -> tuple[dict[str, Counter[str]], dict[str, dict[str, list[str]]]]:
    """What the connected clients hold: per room, each user's joined sessions; per instance,
    each session's rooms."""
    users: dict[str, Counter[str]] = {}
    sessions: dict[str, dict[str, list[str]]] = {}
    for client in clients:
        conn = client.conn
        if conn is None:
            continue
        for room in conn.joined:
            users.setdefault(room, Counter())[client.user.name] += 1
        if conn.joined:
            sessions.setdefault(conn.instance, {})[conn.session] = sorted(conn.joined)
    return users, sessions


def presence_mismatches(found: Snapshot, clients: list[Client]) -> list[dict[str, Any]]:
    """Every difference between the §15 presence keys and the connected clients' rooms."""
    users, sessions = expected_presence(clients)
    where: dict[str, list[str]] = {}  # user -> its sessions, for the samples
    for client in clients:
        if client.conn is not None:
            conn = client.conn
            joined = ",".join(sorted(conn.joined))
            where.setdefault(client.user.name, []).append(
                f"client {client.index} {conn.instance} {conn.session[:8]} [{joined}]"
            )
    out: list[dict[str, Any]] = []
    for room in sorted(users.keys() | found.users.keys()):
        mine, theirs = users.get(room, Counter()), found.users.get(room, {})
        for user in sorted(mine.keys() | theirs.keys()):
            if mine.get(user, 0) != theirs.get(user, 0):
                out.append(
                    {
                        "key": f"ws:room:{room}:users",
                        "user": user,
                        "redis": theirs.get(user),
                        "clients": mine.get(user, 0),
                        "sessions": where.get(user, []),
                    }
                )
    for room in sorted(users.keys() | found.index.keys()):
        want = len(users.get(room, ()))
        have = found.index.get(room)
        if (have or 0) != want:
            out.append({"key": ROOMS_INDEX, "room": room, "redis": have, "clients": want})
    for instance in sorted(sessions.keys() | found.instance_rooms.keys()):
        mine_s, theirs_s = sessions.get(instance, {}), found.instance_rooms.get(instance, {})
        for sid in sorted(mine_s.keys() | theirs_s.keys()):
            have_rooms = theirs_s.get(sid)
            if isinstance(have_rooms, list):
                have_rooms = sorted(have_rooms)
            if mine_s.get(sid) != have_rooms:
                out.append(
                    {
                        "key": f"ws:instance:{instance}:rooms",
                        "session": sid[:8],
                        "redis": have_rooms,
                        "clients": mine_s.get(sid),
                    }
                )
    return out


def room_keys_left(found: Snapshot) -> list[str]:
    """What must be gone once every client has left and every instance stopped."""
    left = [
        f"ws:room:{room}:users {dict(sorted(counts.items())[:5])} (pttl {found.users_ttl[room]})"
        for room, counts in sorted(found.users.items())
    ]
    left += [f"ws:rooms member {room} ({users:g})" for room, users in sorted(found.index.items())]
    left += [
        f"ws:instance:{instance}:rooms ({len(listed)} sessions)"
        for instance, listed in sorted(found.instance_rooms.items())
    ]
    return left


def bad_read_markers(found: Snapshot, ledger: Ledger) -> tuple[int, list[dict[str, Any]]]:
    """The markers checked, and those that name no message of their room, or an id their user
    never sent in a ``read`` there, or sit in a hash without a TTL."""
    checked, bad = 0, []
    for room, markers in sorted(found.read.items()):
        if found.read_ttl[room] < 0:
            bad.append({"room": room, "why": f"no TTL (pttl {found.read_ttl[room]})"})
        for user, text in sorted(markers.items()):
            checked += 1
            try:
                message_id = parse_id(text)
            except ValueError:
                bad.append({"room": room, "user": user, "id": text, "why": "not a message id"})
                continue
            why = None
            if (room, message_id) not in ledger.messages:
                why = "no message of this room has that id"
            elif message_id not in ledger.reads_sent.get((user, room), ()):
                why = "the user's clients never sent it in a read"
            if why is not None:
                bad.append({"room": room, "user": user, "id": format_id(message_id), "why": why})
    return checked, bad
