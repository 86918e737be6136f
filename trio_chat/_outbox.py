"""A session's room messages on their way to Redis: several per round trip, in order.

Signals and read markers (SPEC §15) take the same way, so that they keep their order with the
messages (the typing signal before the message typed) and share a batch with whatever waits
with them (alone, each is a round trip: bench/README "Rooms").

The read loop does not wait for a ``send``'s PUBLISH before it reads the next frame: it hands
the payload to the session's :class:`Outbox` and goes on. A task of the session, started only
while there is something to send, publishes everything handed over meanwhile in one batch (in
the order the frames came), then writes the acks in the same order. So a client that sends
faster than one Redis round trip per message is not held to that pace, and a busy instance
pays one round trip for a burst instead of one per message.

Replies stay in frame order: every other reply of the read loop (``joined``, an ``error``,
``pong``...) waits until the outbox is idle (:meth:`Outbox.wait_idle`), so it cannot overtake
the acks of the sends before it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from ._errors import BackendUnavailable, ProtocolError
from ._messages import INTERNAL, UNAVAILABLE, encode, error_frame
from ._store import keys
from ._store.history import FIELD, parse_id, publish
from ._store.interface import Batch

if TYPE_CHECKING:
    from ._config import HistoryConfig
    from ._metrics import Metrics
    from ._rooms import RoomRules
    from ._session import Session
    from ._store.interface import Backend, Reply

logger = logging.getLogger(__name__)

#: seconds between tries to read what became of sends without an answer
_SETTLE_RETRY = 0.1


@attrs.frozen
class Outgoing:
    """One accepted ``send``: the room message to publish, and what its ack carries."""

    room: str
    #: the payload without its id (:func:`~trio_chat._messages.room_message`)
    message: str
    ts: int
    ref: object


@attrs.frozen
class OutgoingSignal:
    """One accepted ``signal``: published, never stored, never acknowledged."""

    room: str
    #: the ``chat:room`` payload (:func:`~trio_chat._rooms.signal`)
    event: str
    ref: object


@attrs.frozen
class OutgoingRead:
    """One accepted ``read``: the user's marker, moved forward (and announced) if it is."""

    room: str
    user: str
    message_id: str
    #: the room's history (its TTL; with a size, ids are ordered)
    history: HistoryConfig
    #: the ``chat:room`` payload announcing it (:func:`~trio_chat._rooms.read`)
    event: str
    ref: object


Pending = Outgoing | OutgoingSignal | OutgoingRead


class Outbox:
    """Publishes one session's room messages in order, batching those that wait together."""

    #: sends waiting at most; the read loop waits (reads no more frames) beyond it
    LIMIT = 64

    def __init__(
        self,
        session: Session,
        backend: Backend,
        metrics: Metrics,
        rules: RoomRules,
        *,
        settle: float = 0.0,
    ) -> None:
        self._session = session
        self._backend = backend
        self._metrics = metrics
        self._rules = rules
        #: seconds to find out what became of sends whose batch got no answer (see _settle)
        self._settle_for = settle
        self._waiting: list[Pending] = []
        self._idle: trio.Event | None = None  # while a sender task runs: set when it ends

    async def put(self, outgoing: Pending) -> None:
        """Queue ``outgoing`` for the next batch, starting the sender task if none runs.

        A read marker of a room that already has one waiting takes its place when it is newer
        (and is dropped when not): a client that reads each message as it comes sends many,
        and only the last one of a batch can move the marker.
        """
        if isinstance(outgoing, OutgoingRead) and self._supersede(outgoing):
            return
        while len(self._waiting) >= self.LIMIT and self._idle is not None:
            await self._idle.wait()
        self._waiting.append(outgoing)
        if self._idle is None:
            self._idle = trio.Event()
            if not self._session.start_soon(self._send):
                self._idle.set()  # the session is closing: nothing more goes out
                self._idle, self._waiting = None, []

    def _supersede(self, read: OutgoingRead) -> bool:
        """Merge ``read`` into a waiting marker of its room; False when none waits."""
        for n, waiting in enumerate(self._waiting):
            if isinstance(waiting, OutgoingRead) and waiting.room == read.room:
                new, old = parse_id(read.message_id), parse_id(waiting.message_id)
                if new is None or old is None or new > old:
                    self._waiting[n] = read
                return True
        return False

    async def wait_idle(self) -> None:
        """Wait until everything handed over is published and answered (or failed)."""
        while self._idle is not None:
            await self._idle.wait()

    async def _send(self) -> None:
        assert self._idle is not None
        try:
            while self._waiting:
                taken, self._waiting = self._waiting, []
                await self._publish(taken)
        finally:
            self._idle.set()
            self._idle = None

    async def _publish(self, taken: list[Pending]) -> None:
        batch = Batch()
        sends: list[tuple[Outgoing, Reply[str]]] = []  # what is acknowledged: the sends
        for pending in taken:
            match pending:
                case Outgoing(room, message):
                    sends.append(
                        (pending, publish(batch, self._rules(room).history, room, message))
                    )
                case OutgoingSignal(room, event):
                    batch.publish(keys.room_channel(room), event)
                case OutgoingRead(room, user, message_id, history, event):
                    ordered = bool(history.size)
                    batch.mark_read(
                        room, user, message_id, ttl=history.ttl, ordered=ordered, event=event
                    )
        try:
            with self._metrics.publishing():
                await self._backend.execute(batch)
        except BackendUnavailable as exc:
            logger.warning("session %s: %d frame(s) failed: %s", self._session.id, len(taken), exc)
            # what was never sent cannot have been appended: refuse it at once
            outgoing = [send for send, _ in sends]
            found = iter(await self._settle(outgoing) if exc.sent else [None] * len(outgoing))
            for pending in taken:
                # a signal or a marker is not looked for: it was ephemeral, or is not
                if isinstance(pending, Outgoing) and (entry_id := next(found)) is not None:
                    self._session.reply(encode("ack", pending.ref, id=entry_id, ts=pending.ts))
                else:
                    refusal = ProtocolError(
                        UNAVAILABLE, "store unreachable; not delivered", pending.ref
                    )
                    self._session.reply(error_frame(refusal))
        except Exception:
            logger.exception("session %s: publishing failed", self._session.id)
            for pending in taken:
                self._session.reply(
                    error_frame(ProtocolError(INTERNAL, "internal error", pending.ref))
                )
        else:
            for send, entry in sends:
                self._session.reply(encode("ack", send.ref, id=entry.value, ts=send.ts))

    async def _settle(self, taken: list[Outgoing]) -> list[str | None]:
        """Find which of ``taken`` Redis appended after all: the entry id of each, or None.

        A batch that got no answer in time may have run anyway: Redis stalled (SIGSTOP, a long
        fork, a slow disk) runs the script still in its socket buffer when it resumes. So,
        within ``settle`` seconds, the rooms' recent entries are read until two reads in a
        row have answered (the second comes after Redis has gone through whatever the first
        connection still held), and a send whose message is there is acknowledged with its
        id. What is not there, or was not read in time, is answered ``unavailable``. Without
        history there is nothing to read: every one is ``unavailable``.
        """
        found: list[str | None] = [None] * len(taken)
        rooms = {o.room for o in taken if self._rules(o.room).history.size}
        if not rooms or not self._settle_for:
            return found
        reads = 0
        with trio.move_on_after(self._settle_for):
            while reads < 2 and None in found:
                batch = Batch()
                recent = {
                    room: batch.xrevrange(
                        keys.room_channel(room), "+", "-", self._rules(room).history.size
                    )
                    for room in rooms
                }
                try:
                    await self._backend.execute(batch)
                except BackendUnavailable:
                    await trio.sleep(_SETTLE_RETRY)
                    continue
                reads += 1
                # oldest first, so that equal messages (same session, ms and data) pair in order
                appended: dict[tuple[str, str], list[str]] = {}
                for room, entries in recent.items():
                    for entry_id, fields in reversed(entries.value):
                        appended.setdefault((room, fields.get(FIELD, "")), []).append(entry_id)
                found = [
                    ids.pop(0) if (ids := appended.get((o.room, o.message))) else None
                    for o in taken
                ]
        if settled := len(taken) - found.count(None):
            logger.info(
                "session %s: %d of %d send(s) without an answer were appended after all",
                self._session.id,
                settled,
                len(taken),
            )
        return found
