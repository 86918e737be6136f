"""The soak's WebSocket clients: users (a fifth with two devices), their connections, and
each client's loop of connect, rejoin with ``since``, send, refresh and reconnect; besides,
visits to other rooms (join, stay, leave: presence churn) and read markers, and the check of the
``presence_*`` and ``read`` events they get (SPEC §15)."""

from __future__ import annotations

import itertools
import json
import random
import socket
import struct
import time
from collections import deque
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from trio_chat.client import open_client

from .common import format_id, now_ms, parse_id
from .ledger import Gap

if TYPE_CHECKING:
    from .runner import Slot, Soak


class User:
    def __init__(self, name: str) -> None:
        self.name = name
        self.banned = False
        self.unbanned = trio.Event()
        self.unbanned.set()
        self.barrier = 0.0  # no token may be minted before this (unix s): a logout is under way
        self.busy = False  # a logout or ban of this user is in progress
        self.clients: list[Client] = []


class Connection:
    """One WebSocket connection of a client: what it has asked and what it has joined."""

    def __init__(self, chat: Any, slot: Slot, nursery: trio.Nursery) -> None:
        self.chat = chat
        self.slot = slot
        self.nursery = nursery
        self.out, self.out_queue = trio.open_memory_channel[tuple[dict[str, Any], tuple[Any, ...]]](
            1000
        )
        self.refs = itertools.count(1)
        self.pending: dict[int, tuple[Any, ...]] = {}
        self.joined: set[str] = set()
        self.replay_left: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.open_gaps: dict[str, Gap] = {}
        self.session = str(chat.welcome.get("session_id"))
        self.instance = str(chat.welcome.get("instance"))
        #: rooms visited (joined for a while, then left: not the client's own rooms), and
        #: those of them whose ``leave`` is on its way
        self.visiting: set[str] = set()
        self.leaving: set[str] = set()
        #: ref -> (room, id) of the last reads sent (no answer but an error names them)
        self.reads: dict[int, tuple[str, int]] = {}
        #: (room, user) -> present, per the presence events this connection got
        self.presence: dict[tuple[str, str], bool] = {}
        #: (room, user) -> (the last id of a ``read`` event, when it came (unix s))
        self.read_seen: dict[tuple[str, str], tuple[int, float]] = {}


class Client:
    def __init__(self, soak: Soak, index: int, user: User, rooms: list[str]) -> None:
        self.soak = soak
        self.index = index
        self.user = user
        self.rooms = rooms
        #: the rooms it may visit: every other one
        self.visit_rooms = [r for r in soak.room_names if r not in rooms]
        #: per room, the last ids received (what a ``read`` names)
        self.received: dict[str, deque[int]] = {}
        #: per room, the highest id received (before any: the ``last`` of the first
        #: ``joined``, or a floor just under its time): what a rejoin sends as ``since``
        self.since: dict[str, int | None] = dict.fromkeys(rooms)
        self.member_since: dict[str, float] = {}
        self.conn: Connection | None = None
        self.scope: trio.CancelScope | None = None
        self.seq = itertools.count(1)
        self.stopping = False
        self.trail: deque[str] = deque(maxlen=40)  # for explaining a loss

    def note(self, text: str) -> None:
        self.trail.append(f"{self.soak.clock():7.2f}s {text}")

    @property
    def ready(self) -> bool:
        conn = self.conn
        return conn is not None and conn.joined >= set(self.rooms) and not conn.pending

    async def run(self) -> None:
        """Connect, serve, reconnect; until :attr:`stopping`. Never raises (but Cancelled)."""
        soak, delay = self.soak, 0.0
        while not self.stopping:
            await soak.gate(self.user)
            if self.stopping:
                break
            slot = soak.pick_slot()
            began = trio.current_time()
            outcome = "?"
            try:
                scope = self.scope = trio.CancelScope()
                with scope:
                    token = soak.mint(self.user.name)
                    async with open_client(slot.url, token, connect_timeout=5) as chat:
                        outcome = await self._serve(chat, slot)
                if scope.cancelled_caught:
                    outcome = "reset"
            except ConnectionRejected as exc:
                outcome = f"http {exc.status_code}"
                soak.counts[f"refused_{exc.status_code}"] += 1
            except ConnectionClosed as exc:
                outcome = f"closed {exc.reason.code if exc.reason else None}"
            except (OSError, HandshakeError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                outcome = type(exc).__name__
                soak.counts["connect_failures"] += 1
            except Exception as exc:  # never let one client end the soak; count it instead
                outcome = f"error {type(exc).__name__}: {exc}"
                soak.counts[f"client_error_{type(exc).__name__}"] += 1
            finally:
                self.scope = None
                self._ended(outcome)
            if self.stopping:
                break
            soak.close_codes[outcome] += 1
            if trio.current_time() - began > 5:
                delay = 0.0
            delay = min(max(delay * 2, 0.05), 2.0)
            await trio.sleep(delay * random.uniform(0.5, 1.0))

    async def _serve(self, chat: Any, slot: Slot) -> str:
        async with trio.open_nursery() as nursery:
            conn = self.conn = Connection(chat, slot, nursery)
            self.soak.counts["connects"] += 1
            self.note(f"connected to {slot.instance_id} session {conn.session[:8]}")
            nursery.start_soon(self._writer, conn)
            for room in self.rooms:
                self._join(conn, room)
            try:
                while True:
                    self._handle(conn, json.loads(await chat.ws.get_message()))
            except ConnectionClosed as exc:
                nursery.cancel_scope.cancel()
                return f"closed {exc.reason.code if exc.reason else None}"
        raise AssertionError("unreachable")

    async def _writer(self, conn: Connection) -> None:
        async for frame, what in conn.out_queue:
            if what[0] == "send":
                _, room, n = what
                conn.pending[frame["ref"]] = ("send", room, n, now_ms())
                self.soak.ledger.sends[(self.index, n)] = "sent"
                self.soak.counts["sent"] += 1
            elif what[0] == "read":  # answered only when refused
                _, room, message_id = what
                conn.reads[frame["ref"]] = what[1:]
                if len(conn.reads) > 256:
                    del conn.reads[next(iter(conn.reads))]
                self.soak.ledger.read_sent(self.user.name, room, message_id)
            elif what[0] != "none":
                conn.pending[frame["ref"]] = what
            try:
                await conn.chat.ws.send_message(json.dumps(frame))
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the reader sees the close

    def _queue(self, conn: Connection, frame: dict[str, Any], what: tuple[Any, ...]) -> bool:
        frame["ref"] = next(conn.refs)
        try:
            conn.out.send_nowait((frame, what))
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    def _join(self, conn: Connection, room: str) -> None:
        since = self.since[room]
        frame: dict[str, Any] = {"type": "join", "room": room}
        if since is not None:
            frame["since"] = format_id(since)
        self._queue(conn, frame, ("join", room, since))

    async def _join_later(self, conn: Connection, room: str) -> None:
        await trio.sleep(random.uniform(0.3, 1.0))
        self._join(conn, room)

    def _refresh(self, conn: Connection) -> None:
        if time.time() >= self.user.barrier:  # else a logout is closing this session anyway
            self._queue(
                conn, {"type": "refresh", "token": self.soak.mint(self.user.name)}, ("refresh",)
            )

    async def _refresh_later(self, conn: Connection) -> None:
        await trio.sleep(random.uniform(1.0, 2.0))
        self._refresh(conn)

    def try_send(self, rng: random.Random) -> bool:
        conn = self.conn
        rooms = None if conn is None else conn.joined - conn.leaving
        if conn is None or not rooms:
            return False
        room = rng.choice(sorted(rooms))
        n = next(self.seq)
        frame = {"type": "send", "room": room, "data": {"c": self.index, "n": n}}
        self.soak.ledger.sends[(self.index, n)] = "queued"
        return self._queue(conn, frame, ("send", room, n))

    def try_read(self, rng: random.Random) -> bool:
        """Mark a message read: in a joined room, the newest id received there, or (a quarter
        of the time) one of the last few, which must not move the marker back."""
        conn = self.conn
        if conn is None:
            return False
        rooms = sorted(r for r in conn.joined - conn.leaving if self.received.get(r))
        if not rooms:
            return False
        room = rng.choice(rooms)
        ids = self.received[room]
        message_id = max(ids) if rng.random() < 0.75 else rng.choice(list(ids))
        frame = {"type": "read", "room": room, "id": format_id(message_id)}
        return self._queue(conn, frame, ("read", room, message_id))

    def try_visit(self, rng: random.Random, stay: float) -> bool:
        """Join a room not its own, stay ``stay`` seconds (less if the traffic ends), leave."""
        conn = self.conn
        if conn is None or conn.visiting or not self.visit_rooms or self.soak.ending.is_set():
            return False
        room = rng.choice(self.visit_rooms)
        try:
            conn.nursery.start_soon(self._visit, conn, room, stay)
        except RuntimeError:  # the connection is ending
            return False
        conn.visiting.add(room)
        return True

    async def _visit(self, conn: Connection, room: str, stay: float) -> None:
        if not self._queue(conn, {"type": "join", "room": room}, ("visit", room)):
            return
        self.soak.counts["visits"] += 1
        self.note(f"visit {room}")
        with trio.move_on_after(stay):
            await self.soak.ending.wait()
        conn.leaving.add(room)
        if self._queue(conn, {"type": "leave", "room": room}, ("leave", room)):
            self.note(f"leave {room}")

    def reset(self) -> bool:
        """Drop the socket with a TCP RST (no close handshake), as a dead network would."""
        conn, scope = self.conn, self.scope
        if conn is None or scope is None:
            return False
        with suppress(AttributeError, OSError):
            sock = conn.chat.ws._stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        scope.cancel()
        return True

    async def reconnect(self) -> None:
        """Close the connection normally; :meth:`run` connects again."""
        conn = self.conn
        if conn is not None:
            with trio.move_on_after(5), suppress(Exception):
                await conn.chat.ws.aclose(1000, "moving on")

    async def close(self) -> None:
        self.stopping = True
        conn = self.conn
        if conn is not None:
            with trio.move_on_after(5), suppress(Exception):
                await conn.chat.ws.aclose(1000, "soak over")

    def _ended(self, outcome: str) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        self.note(f"connection ended: {outcome}")
        ledger = self.soak.ledger
        for what in conn.pending.values():
            if what[0] == "send":
                ledger.sends[(self.index, what[2])] = "unknown"
                self.soak.counts["send_unknown"] += 1
        conn.out.close()
        with suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            while True:
                _, what = conn.out_queue.receive_nowait()
                if what[0] == "send":
                    ledger.sends[(self.index, what[2])] = "never_sent"

    def _handle(self, conn: Connection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        soak, ledger = self.soak, self.soak.ledger
        if kind == "message":
            room, message_id = frame["room"], parse_id(frame["id"])
            via = "live"
            if conn.replay_left.get(room):
                conn.replay_left[room] -= 1
                via = "replay"
            if (gap := conn.open_gaps.pop(room, None)) is not None:
                gap.hi = message_id
            last = conn.last.get(room)
            if last is not None and message_id <= last:
                ledger.counts["order_violations"] += 1
                if len(ledger.samples["order"]) < 20:
                    ledger.samples["order"].append(
                        {
                            "client": self.index,
                            "room": room,
                            "id": frame["id"],
                            "after": format_id(last),
                        }
                    )
            else:
                conn.last[room] = message_id
            if room not in conn.joined:
                ledger.counts["stray_messages"] += 1
            if room in self.since:  # a room of its own (not a visit)
                since = self.since[room]
                if since is None or message_id > since:
                    self.since[room] = message_id
            received = self.received.get(room)
            if received is None:
                received = self.received[room] = deque(maxlen=8)
            received.append(message_id)
            ledger.deliver(self.index, room, message_id, frame.get("data"), via)
            return
        if kind in ("presence_join", "presence_leave"):
            ledger.counts[kind] += 1
            key, present = (str(frame.get("room")), str(frame.get("user"))), kind == "presence_join"
            if conn.presence.get(key) is present:  # twice the same way (Redis lost a count?)
                ledger.counts["presence_repeats"] += 1
            conn.presence[key] = present
            return
        if kind == "read" and "ref" not in frame:
            self._read_event(conn, frame)
            return
        what = conn.pending.pop(frame.get("ref", -1), None)
        if kind == "ack" and what is not None and what[0] == "send":
            _, room, n, t_send = what
            ledger.acked(self.index, room, parse_id(frame["id"]), t_send, n)
        elif kind == "joined" and what is not None and what[0] == "join":
            _, room, since_sent = what
            conn.joined.add(room)
            joined_at = now_ms()
            if room not in self.member_since:
                self.member_since[room] = joined_at
                ledger.join(room, self.index, joined_at)
                if self.since[room] is None:
                    # the room's last message when joined (every later one reaches us), or,
                    # in an empty room or from a server that does not say, a floor under
                    # every id Redis can give a message sent after this moment
                    last = frame.get("last")
                    self.since[room] = parse_id(last) if last else (int(joined_at) - 1) << 32
            if "recovered" in frame:
                ledger.counts["rejoins"] += 1
                if frame.get("missed"):
                    conn.replay_left[room] = int(frame["missed"])
                if not frame["recovered"]:
                    ledger.counts["recovered_false"] += 1
                    label = soak.fault_before(time.time())
                    gap = Gap(since_sent or 0, (int(joined_at) + 1) << 32, label)
                    ledger.add_gap(self.index, room, gap)
                    conn.open_gaps[room] = gap
                    self.note(
                        f"rejoin {room} since {format_id(since_sent or 0)}: "
                        f"recovered false ({label})"
                    )
        elif kind == "joined" and what is not None and what[0] == "visit":
            conn.joined.add(what[1])
            soak.counts["visits_joined"] += 1
            self.note(f"visit {what[1]}: joined")
        elif kind == "left" and what is not None and what[0] == "leave":
            self.note(f"leave {what[1]}: left")
            conn.joined.discard(what[1])
            conn.visiting.discard(what[1])
            conn.leaving.discard(what[1])
        elif kind == "error" and frame.get("ref") in conn.reads:
            ledger.read_errors[str(frame.get("code"))] += 1
        elif kind == "error":
            code = str(frame.get("code"))
            if what is not None and what[0] == "visit":
                ledger.counts[f"visit_error_{code}"] += 1
                self.note(f"visit {what[1]}: error {code}")
            elif what is not None and what[0] == "send":
                ledger.sends[(self.index, what[2])] = f"error {code}"
                ledger.errors_at[(self.index, what[2])] = (what[3], now_ms(), conn.slot.instance_id)
                ledger.send_errors[code] += 1
            elif what is not None and what[0] == "join":
                ledger.counts[f"join_error_{code}"] += 1
                self.note(f"join {what[1]}: error {code}")
                conn.nursery.start_soon(self._join_later, conn, what[1])
            elif what is not None and what[0] == "refresh":
                ledger.counts[f"refresh_error_{code}"] += 1
                if code == "unavailable":  # Redis is down: the token is still good, try again
                    conn.nursery.start_soon(self._refresh_later, conn)
            else:
                ledger.counts[f"error_{code}"] += 1
        elif kind == "token_expiring":
            self._refresh(conn)
        elif kind == "refreshed":
            soak.counts["refreshes"] += 1
        elif kind == "logout":
            self.note(f"logout {frame.get('reason')}")
            soak.counts[f"logout_{frame.get('reason')}"] += 1

    def _read_event(self, conn: Connection, frame: dict[str, Any]) -> None:
        """A ``read {room, user, id}``: the id must be one that user's clients sent in a read
        there, and above the last this connection saw for that user and room (a marker only
        moves forward), but after a fault that may have lost the markers (Redis restarted
        empty); on a cluster the event follows the script in a second round trip, so two
        instances' events may come in the other order (counted apart)."""
        soak, ledger = self.soak, self.soak.ledger
        room, user = str(frame.get("room")), str(frame.get("user"))
        ledger.counts["read_events"] += 1
        try:
            message_id = parse_id(str(frame.get("id")))
        except ValueError:
            message_id = -1
        if message_id not in ledger.reads_sent.get((user, room), ()):
            ledger.counts["read_events_foreign"] += 1
            if len(ledger.samples["read_foreign"]) < 20:
                ledger.samples["read_foreign"].append({"client": self.index, **frame})
        key, now = (room, user), time.time()
        before = conn.read_seen.get(key)
        conn.read_seen[key] = (message_id, now)
        if before is None or message_id > before[0]:
            return
        excuse = soak.data_loss_between(before[1] - 2.0, now)
        if excuse is not None:
            ledger.read_backwards_by_fault[excuse] += 1
        elif soak.cluster is not None:
            ledger.counts["read_events_reordered"] += 1
        else:
            ledger.counts["read_backwards"] += 1
            if len(ledger.samples["read_backwards"]) < 20:
                ledger.samples["read_backwards"].append(
                    {
                        "client": self.index,
                        "instance": conn.instance,
                        "room": room,
                        "user": user,
                        "id": format_id(message_id),
                        "after": format_id(before[0]),
                        "t": round(soak.clock(), 2),
                    }
                )
