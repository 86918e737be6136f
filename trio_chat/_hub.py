"""This instance's view of its sessions, and the Pub/Sub pump that feeds them.

The hub keeps the local indexes (session id, user id, room → sessions), subscribes a room's
channel when its first local member joins and unsubscribes after the last one leaves, and
runs the pump: one task reading the Pub/Sub connection and handing each frame to local
sessions with :meth:`Session.deliver`, which never blocks. A message is decoded and encoded
once per instance, not once per recipient.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict, deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from ._auth import AuthRecord
from ._errors import BackendUnavailable, ChatError, single_error
from ._messages import dumps, encode, new_message_id
from ._metrics import Metrics
from ._rooms import ROOM_EVENTS, SIGNAL, RoomRules, client_frame
from ._store import keys
from ._store.history import StreamId, format_id, message_frame, parse_id, stored
from ._store.interface import Backend, Batch, Subscription
from ._timers import Timers
from ._wire import Cork, text_frame

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from ._config import Config
    from ._jwks import Jwks
    from ._session import Session

logger = logging.getLogger(__name__)

#: logout reasons (SPEC §4) -> close code (SPEC §7)
LOGOUT_CLOSE_CODES = {"logout": 4000, "kicked": 4000, "banned": 4403, "revoked": 4401}
HEARTBEAT_TIMEOUT_CLOSE = 4408
#: longest wait between two Pub/Sub reconnection attempts, in seconds: short enough that fan-out
#: resumes within half a second of a Redis Cluster failover (or a restart), while two connection
#: attempts a second per instance cost a Redis that is down nothing
_MAX_BACKOFF = 0.5
#: ids of handed-out messages kept per room for the catch-up (see Hub._recent)
_RECENT_IDS = 32
#: messages a ``server.listen`` reader may fall behind before it is told (SlowListener)
LISTEN_BUFFER = 1000
#: failed cleanups kept for a retry; beyond, the oldest are left to the TTLs and the reaper
_MAX_FAILED_CLEANUPS = 100_000


class Hub:
    """Local sessions, room subscriptions, auth-record cache and the Pub/Sub pump.

    Args:
        config: the server configuration.
        backend: the connected store; it must outlive the hub's :meth:`run`.
        metrics: where the pump and the connections count; a fresh one when None.
    """

    def __init__(self, config: Config, backend: Backend, metrics: Metrics | None = None) -> None:
        self.config = config
        self.backend = backend
        self.metrics = Metrics(process=False) if metrics is None else metrics
        self.instance_id = config.server.instance_id
        self.sessions: dict[str, Session] = {}
        self._by_user: defaultdict[str, set[Session]] = defaultdict(set)
        self._by_room: defaultdict[str, set[Session]] = defaultdict(set)
        # Sessions whose join reads the room's stream (a first join, a replay): the pump holds
        # their live messages of that room until the answer is written, then hands over those
        # after the stream's last entry at the read.
        self._holds: dict[str, dict[Session, _Hold]] = {}
        # With history: per subscribed room, the id of the last message the pump handed out
        # (at first, the room's last entry before we subscribed). A reconnected pump reads
        # what followed from the stream.
        self._delivered: dict[str, StreamId] = {}
        # Per room, the last id a catch-up handed out, until a live message passes it: live
        # ones up to it were in the stream the catch-up read, and so handed out already.
        self._caught_up: dict[str, StreamId] = {}
        # Per room with history, the ids of the last messages handed out. A catch-up reads
        # from the oldest of them and skips these: on a Redis Cluster a master deposed while
        # it was stalled can publish a late write with a higher id than messages its promoted
        # replica stored meanwhile, which a catch-up from the last id alone would skip.
        self._recent: dict[str, deque[StreamId]] = {}
        #: each room's options (SPEC §15)
        self.rooms = RoomRules(config)
        # server.listen(room): the application's own readers of rooms (bots, archivers)
        self._listeners: dict[str, set[_Listener]] = {}
        self._auth_cache: dict[str, tuple[float, AuthRecord | None]] = {}
        # Bumped by every announced change; a read that straddles one is not cached.
        self._auth_generation = 0
        # Cleanups Redis refused (it was down); the heartbeat sends them again (SPEC §8).
        self._failed_cleanups: list[Batch] = []
        #: a session and a room it is not in, of a join or leave that failed half way: Redis
        #: may still count it there; the heartbeat settles it (registry.settle)
        self.unsettled: set[tuple[Session, str]] = set()
        self._subscription: Subscription | None = None
        self._subscribed: set[str] = set()
        # Serializes SUBSCRIBE/UNSUBSCRIBE so a join never sees a half-made subscription.
        self._subscription_lock = trio.Lock()
        # Channels that joins wait to have subscribed, for the next SUBSCRIBE (while one of
        # them is sending what waited before).
        self._to_subscribe: dict[str, _Subscribing] = {}
        self._subscribe_flight: trio.Event | None = None  # set when the SUBSCRIBE out ends
        self._pump_ready = trio.Event()
        self._up_since: float | None = None  # when the current Pub/Sub connection was ready
        self._pump_stale = False
        self._probe_nonce = 0
        self._probe_seen = trio.Event()
        # While the pump reads a backlog, each socket gets one write for all of it (and, with
        # server.write_delay, at most one write per delay).
        self._cork = Cork(config.server.write_delay)
        self._received = 0  # Pub/Sub messages read, for telling a stale pump from a busy one
        #: Pub/Sub reconnections since start (lost or stale connections)
        self.reconnects = 0
        #: whether the last heartbeat round reached the store (``trio_chat_redis_up``)
        self.redis_up = True
        #: the identity provider's key set, with ``auth.jwks_url`` (``/readyz`` waits for it)
        self.jwks: Jwks | None = None
        #: one task's worth of timers for every session (token expiry)
        self.timers = Timers()
        self._logout_waiters: dict[str, _Acknowledgements] = {}
        # Acknowledgements are published by a task of their own: the pump never awaits Redis.
        self._acks, self._acks_out = trio.open_memory_channel[tuple[str, str]](1000)
        self.draining = False

    @property
    def base_channels(self) -> tuple[str, ...]:
        return (keys.LOGOUT_CHANNEL, keys.CHANGED_CHANNEL, keys.control_channel(self.instance_id))

    # --- local indexes -----------------------------------------------------------------------

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self._by_user[session.user_id].add(session)

    def discard(self, session: Session) -> list[str]:
        """Forget ``session`` locally; return the rooms it left that now have no local member."""
        self.sessions.pop(session.id, None)
        if not _discard(self._by_user, session.user_id, session):
            self._auth_cache.pop(session.user_id, None)  # no local session needs it any more
        emptied = []
        for room in session.rooms:
            self._end_hold(room, session)
            if not _discard(self._by_room, room, session) and not self._needed(room):
                emptied.append(room)
        return emptied

    def _needed(self, room: str) -> bool:
        """Whether the room's channel is needed, though no local session is a member."""
        return room in self._holds or room in self._listeners

    def user_sessions(self, user_id: str) -> set[Session]:
        return self._by_user.get(user_id, set())

    def room_members(self, room: str) -> set[Session]:
        return self._by_room.get(room, set())

    # --- rooms ---------------------------------------------------------------------------------

    async def join(self, session: Session, room: str, *, hold: bool = False) -> None:
        """Add ``session`` to ``room`` locally, subscribing the room's channel first if needed.

        With ``hold``, the room's live messages for the session are held back from now on,
        until :meth:`release` (while the join reads the stream). Joining a room already joined
        only holds.

        Raises:
            BackendUnavailable: the channel could not be subscribed; nothing was changed.
        """
        if hold:
            self._holds.setdefault(room, {})[session] = _Hold()
            _discard(self._by_room, room, session)
        try:
            await self._subscribe(room)
        except BaseException:
            if hold:
                self._end_hold(room, session)
            raise
        session.rooms.add(room)
        if not hold:
            self._by_room[room].add(session)

    def delivered(self, room: str, message_id: StreamId) -> bool:
        """Whether the pump has handed out ``room``'s messages up to ``message_id`` (so the
        room's stream holds a message that recent)."""
        last = self._delivered.get(room)
        return last is not None and message_id <= last

    def release(self, session: Session, room: str, replayed_to: StreamId | None) -> None:
        """End the hold of :meth:`join`: the session has everything up to ``replayed_to`` (the
        room's last entry when the join read it; None: there was none), so hand over the held
        live messages that came after it, and from now on every live one."""
        hold = self._holds.get(room, {}).get(session)
        if hold is None:
            return
        later = hold.release(replayed_to, self._delivered.get(room))
        if later is None:
            return  # the pump has yet to pass the replay: it drops until then (_Hold.offer)
        self._end_hold(room, session)
        self._by_room[room].add(session)
        for frame in later:
            session.deliver(frame)

    def _end_hold(self, room: str, session: Session) -> None:
        holds = self._holds.get(room)
        if holds is not None and holds.pop(session, None) is not None and not holds:
            del self._holds[room]

    async def leave(self, session: Session, room: str) -> None:
        session.rooms.discard(room)
        self._end_hold(room, session)
        if not _discard(self._by_room, room, session) and not self._needed(room):
            await self.release_rooms([room])

    async def release_rooms(self, rooms: Iterable[str]) -> None:
        """Unsubscribe the channels of ``rooms`` that still have no local member."""
        async with self._subscription_lock:
            idle = [
                r
                for r in rooms
                if r not in self._by_room
                and not self._needed(r)
                and keys.room_channel(r) in self._subscribed
            ]
            if not idle:
                return
            channels = [keys.room_channel(r) for r in idle]
            self._subscribed.difference_update(channels)
            for room in idle:
                self._delivered.pop(room, None)
                self._caught_up.pop(room, None)
                self._recent.pop(room, None)
            if self._subscription is not None:
                try:
                    await self._subscription.unsubscribe(*channels)
                except BackendUnavailable:
                    pass  # the pump reconnects and subscribes only what is still needed

    async def _subscribe(self, room: str) -> None:
        channel = keys.room_channel(room)
        if channel in self._subscribed:
            return
        floor = None
        if self.rooms(room).history.size:
            # Before subscribing: every message after this one reaches us live or, if the
            # Pub/Sub connection drops meanwhile, through the catch-up read.
            batch = Batch()
            last = batch.xrevrange(channel, "+", "-", 1)
            await self.backend.execute(batch)
            floor = parse_id(last.value[0][0]) if last.value else (0, 0)
        await self._subscribe_channel(channel)
        # (subscribed meanwhile by a reconnected pump, for this very join: the floor is still
        # ours to set)
        if floor is not None:
            self._delivered.setdefault(room, floor)

    async def _subscribe_channel(self, channel: str) -> None:
        """Subscribe ``channel``, in one SUBSCRIBE with every other channel asked for meanwhile.

        Under a burst of first joins (a reconnect storm), one subscription round trip at a time
        for each room would be the limit of the whole instance: instead, the first caller sends
        what is waiting, and while it is out the next ones gather for the next SUBSCRIBE.

        Raises:
            BackendUnavailable: the SUBSCRIBE holding the channel failed, or the pump is down.
        """
        if channel in self._subscribed:
            return
        waiter = self._to_subscribe.setdefault(channel, _Subscribing())
        while not waiter.done.is_set():
            if (flight := self._subscribe_flight) is not None:
                await flight.wait()  # then ours is done, or it is our turn to send
                continue
            self._subscribe_flight = flight = trio.Event()
            try:
                # for the others too: bounded, as every Redis round trip is
                with trio.CancelScope(shield=True):
                    await self._send_subscribes()
            finally:
                self._subscribe_flight = None
                flight.set()
        if waiter.error is not None:
            raise BackendUnavailable(str(waiter.error)) from waiter.error

    async def _send_subscribes(self) -> None:
        """One SUBSCRIBE of every channel waiting now."""
        async with self._subscription_lock:
            group, self._to_subscribe = self._to_subscribe, {}
            todo = [channel for channel in group if channel not in self._subscribed]
            try:
                if todo:
                    if self._subscription is None:
                        raise BackendUnavailable("the Pub/Sub connection is down")
                    await self._subscription.subscribe(*todo)
                    self._subscribed.update(todo)
            except BackendUnavailable as exc:
                for waiter in group.values():
                    waiter.error = exc
            for waiter in group.values():
                waiter.done.set()

    # --- auth records --------------------------------------------------------------------------

    async def auth_record(self, user_id: str) -> AuthRecord | None:
        """``auth:<uid>``, from a local copy at most ``auth.cache_ttl`` seconds old.

        Raises:
            BackendUnavailable: the store could not be reached.
        """
        stamp = self.auth_stamp()
        cached = self._auth_cache.get(user_id)
        if cached is not None and stamp[0] - cached[0] < self.config.auth.cache_ttl:
            return cached[1]
        batch = Batch()
        reply = batch.hgetall(keys.auth(user_id))
        await self.backend.execute(batch)
        record = AuthRecord.from_hash(reply.value) if reply.value else None
        self.remember_auth(user_id, record, stamp)
        return record

    def auth_stamp(self) -> tuple[float, int]:
        """When a read of ``auth:<uid>`` begins: for :meth:`remember_auth`."""
        return trio.current_time(), self._auth_generation

    def remember_auth(
        self, user_id: str, record: AuthRecord | None, stamp: tuple[float, int]
    ) -> None:
        """Keep ``auth:<uid>`` as read from :meth:`auth_stamp`'s moment on (the handshake's read
        spares its first join one), for a user with a local session, unless a change was
        announced while it was read: that copy may predate it."""
        read_at, generation = stamp
        if generation != self._auth_generation or self.config.auth.cache_ttl <= 0:
            return
        if user_id in self._by_user:
            self._auth_cache[user_id] = (read_at, record)

    def forget_auth(self, user_id: str) -> None:
        self._auth_cache.pop(user_id, None)
        self._auth_generation += 1

    # --- cleanups that failed ---------------------------------------------------------------------

    def retry_cleanup(self, batch: Batch) -> None:
        """Keep a cleanup that could not reach Redis, for :meth:`flush_cleanups`."""
        if len(self._failed_cleanups) >= _MAX_FAILED_CLEANUPS:
            logger.warning("too many failed cleanups kept; the oldest is left to the TTLs")
            del self._failed_cleanups[0]
        self._failed_cleanups.append(batch)

    @property
    def cleanups_pending(self) -> bool:
        return bool(self._failed_cleanups)

    async def flush_cleanups(self) -> None:
        """Send the failed cleanups again, in one round trip.

        Raises:
            BackendUnavailable: still unreachable; they are kept for the next try.
        """
        if not self._failed_cleanups:
            return
        pending, self._failed_cleanups = self._failed_cleanups, []
        batch = Batch()
        for failed in pending:
            batch.commands.extend(failed.commands)
        try:
            await self.backend.execute(batch)
        except BackendUnavailable:
            self._failed_cleanups[:0] = pending
            raise
        logger.info("retried %d session cleanups", len(pending))

    # --- closing -------------------------------------------------------------------------------

    async def ping_sessions(self) -> None:
        """WebSocket-ping every session each ``heartbeat.ping_interval``; a session whose pong
        has not come back within ``heartbeat.ping_timeout`` is closed with 4408.

        One task for all sessions: a pinging task per socket would cost each idle connection
        kilobytes. Runs until cancelled.
        """
        heartbeat = self.config.heartbeat
        await trio.sleep(heartbeat.ping_interval)
        while True:
            pinged = [s for s in self.sessions.values() if not s.closing]
            for session in pinged:
                session.ping()
            await trio.sleep(heartbeat.ping_timeout)
            for session in pinged:
                if session.pong is not None and not session.pong.answered:
                    session.close(HEARTBEAT_TIMEOUT_CLOSE, "heartbeat timeout")
            await trio.sleep(max(0.0, heartbeat.ping_interval - heartbeat.ping_timeout))

    def close_all(self, code: int, reason: str) -> None:
        for session in list(self.sessions.values()):
            session.close(code, reason)

    # --- the pump ------------------------------------------------------------------------------

    @property
    def pump_healthy(self) -> bool:
        """Subscribed, and the last liveness probe came back in time."""
        return self._subscription is not None and not self._pump_stale

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one Pub/Sub connection subscribed to every channel this instance needs.

        ``started()`` is called once the first connection is subscribed. On a lost connection,
        or a stale one (a probe published to our own control channel did not come back), it
        reconnects with capped exponential backoff and jitter, then subscribes again.
        Runs until cancelled.

        Raises:
            BackendUnavailable: the very first connection failed.
        """
        delay = 0.0
        while True:
            self._up_since = None
            try:
                await self._pump(task_status)
            except BackendUnavailable as exc:
                if not self._pump_ready.is_set():
                    raise
                self.reconnects += 1
                if self._up_since is not None:  # it was up: say so once, not every attempt
                    logger.warning("Pub/Sub connection lost (%s); reconnecting", exc)
                else:
                    logger.debug("Pub/Sub reconnection failed (%s)", exc)
            else:
                delay = 0.0
            finally:
                self._subscription = None
            if self._up_since is not None and trio.current_time() - self._up_since > _MAX_BACKOFF:
                delay = 0.0  # it was up for a while: this loss starts a new series
            delay = min(max(delay * 2, 0.05), _MAX_BACKOFF)
            await trio.sleep(delay * random.uniform(0.5, 1.0))

    async def _pump(self, task_status: trio.TaskStatus[None]) -> None:
        """One connection's life; returns (to reconnect) when its probes stop coming back."""
        async with self.backend.subscription() as subscription:
            await self._resubscribe(subscription)
            await self._catch_up()
            self._up_since = trio.current_time()
            self._pump_stale = False
            if not self._pump_ready.is_set():
                self._pump_ready.set()
                task_status.started()
            with trio.CancelScope() as scope, single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._probe, scope)
                    nursery.start_soon(self._send_acks)
                    if self._cork.delay:
                        nursery.start_soon(self._cork.run)
                    try:
                        async for channel, payload in subscription.messages():
                            self._received += 1
                            self._dispatch(channel, payload)
                            if not subscription.backlog():
                                self._cork.release()
                    finally:
                        self._cork.flush()
                    nursery.cancel_scope.cancel()

    async def _probe(self, pump_scope: trio.CancelScope) -> None:
        """Prove the pump alive: publish to our own control channel, expect it back."""
        interval = self.config.session.instance_ttl / 3
        timeout = max(1.0, 2 * self.config.redis.command_timeout)
        channel = keys.control_channel(self.instance_id)
        while True:
            await trio.sleep(interval)
            self._probe_nonce += 1
            self._probe_seen = trio.Event()
            batch = Batch()
            batch.publish(channel, dumps({"type": "probe", "nonce": self._probe_nonce}))
            try:
                await self.backend.execute(batch)
            except BackendUnavailable:
                continue  # Redis is down: the pump notices on its own connection
            received = self._received
            with trio.move_on_after(timeout):
                await self._probe_seen.wait()
                continue
            if self._received != received:
                # Messages are flowing: the pump is alive, only behind (a backlog). Replacing
                # the connection would drop that backlog; say so and keep going.
                logger.warning("Pub/Sub pump is behind: probe %d not back yet", self._probe_nonce)
                continue
            logger.error(
                "Pub/Sub pump is stale: probe %d not received within %.1fs; reconnecting",
                self._probe_nonce,
                timeout,
            )
            self._pump_stale = True
            self.reconnects += 1
            pump_scope.cancel()
            return

    async def _resubscribe(self, subscription: Subscription) -> None:
        async with self._subscription_lock:
            rooms = self._by_room.keys() | self._holds.keys() | self._listeners.keys()
            channels = [*self.base_channels, *map(keys.room_channel, rooms)]
            await subscription.subscribe(*channels)
            self._subscribed = set(channels)
            self._subscription = subscription

    async def _catch_up(self) -> None:
        """Hand out what each subscribed room's stream holds that the pump has not handed out:
        what was published while the Pub/Sub connection was down (SPEC §11).

        It reads from the oldest of the room's last handed-out ids (``_recent``) and skips
        those, so a stored message is found even when a higher id was handed out before it (a
        deposed cluster master's late write). Runs before the live messages of the new
        connection are read, so members get the missed messages first; those that also
        arrive live are dropped as already handed out.
        """
        if not self._delivered:
            return
        batch = Batch()
        reads = {}
        for room, last in self._delivered.items():
            recent = self._recent.get(room, ())
            start = min(recent, default=last)
            reads[room] = batch.xrange(
                keys.room_channel(room),
                f"({format_id(start)}",
                "+",
                self.rooms(room).history.size + len(recent),
            )
        await self.backend.execute(batch)
        caught_up = 0
        for room, entries in reads.items():
            self._caught_up.pop(room, None)  # this read is the one that vouches now
            handed_out = set(self._recent.get(room, ()))
            for message in stored(entries.value):
                message_id = parse_id(message["id"])
                if message_id in handed_out:
                    continue
                caught_up += 1
                self._deliver_room(room, message)
                if message_id is not None:
                    self._caught_up[room] = max(message_id, self._caught_up.get(room, message_id))
        if caught_up:
            logger.info("Pub/Sub reconnected: %d missed message(s) handed out", caught_up)
        self._cork.flush()  # the delayed flushes start with the pump's loop, after this

    def _dispatch(self, channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
            if channel.startswith(keys.ROOM_CHANNEL_PREFIX):
                room = channel.removeprefix(keys.ROOM_CHANNEL_PREFIX)
                if "type" in event:
                    self._room_event(room, event)
                else:
                    self._deliver_room(room, event)
            elif channel == keys.LOGOUT_CHANNEL:
                self._logout(event)
            elif channel == keys.CHANGED_CHANNEL:
                self.forget_auth(str(event["user_id"]))
            elif channel.startswith(keys.CONTROL_CHANNEL_PREFIX):
                self._control(event)
        except (ValueError, KeyError, TypeError, AttributeError):
            # Another publisher's bad payload must not take the pump down.
            logger.warning("ignored malformed payload on %s: %.200r", channel, payload)

    def _deliver_room(self, room: str, event: dict[str, object]) -> None:
        self.metrics.pump_lag(event.get("ts"))
        message_id = parse_id(event["id"])
        if message_id is not None and room in self._delivered:
            if (caught_up := self._caught_up.get(room)) is not None:
                if message_id <= caught_up:
                    return  # the catch-up handed it out already
                del self._caught_up[room]
            # the last handed out, not the highest: after Redis restarted empty on a clock
            # behind the old one, ids start lower, and the next catch-up must read from there
            self._delivered[room] = message_id
            if (recent := self._recent.get(room)) is None:
                recent = self._recent[room] = deque(maxlen=_RECENT_IDS)
            recent.append(message_id)
        if (listeners := self._listeners.get(room)) is not None:
            for listener in list(listeners):
                listener.offer(room, event)
        members = self._by_room.get(room)
        holds = self._holds.get(room)
        if not members and not holds:
            return
        origin = event.get("session")
        frame = text_frame(message_frame(room, str(event["id"]), event))
        if members:
            self._fan_out("message", members, origin, frame)
        if holds:
            for session, hold in list(holds.items()):
                if session.id != origin and hold.offer(message_id, frame):
                    # past the replay: from now on, one of the members
                    self._end_hold(room, session)
                    self._by_room[room].add(session)
                    session.deliver(frame, self._cork)

    def _room_event(self, room: str, event: dict[str, object]) -> None:
        """A presence change, a signal or a read marker (SPEC §15): to the room's members but
        the session it came from. A member whose outbound queue is more than half full gets no
        signal: typing indicators go before the messages it would be closed for."""
        kind = event["type"]
        members = self._by_room.get(room)
        if not members or kind not in ROOM_EVENTS:
            return
        origin = event.get("session")
        frame = text_frame(encode(str(kind), **client_frame(event)))
        delivered = dropped = 0
        for session in list(members):  # a delivery may close a session, and so change the set
            if session.id == origin:
                continue
            if kind == SIGNAL and session.congested:
                dropped += 1
            else:
                delivered += session.deliver(frame, self._cork)
        if dropped:
            self.metrics.signal_dropped(dropped)
        self.metrics.fanout(str(kind), delivered)

    def _control(self, event: dict[str, object]) -> None:
        """A message on our own control channel (SPEC §4 ``ws:control:<id>``)."""
        match event.get("type"):
            case "direct":
                self._deliver_direct(event)
            case "probe":
                if event.get("nonce") == self._probe_nonce:
                    self._probe_seen.set()
            case "logout_ack":
                if (waiter := self._logout_waiters.get(str(event["request"]))) is not None:
                    waiter.acknowledge(int(str(event["closed"])))
            case _:
                logger.warning("ignored unknown control message %.200r", event)

    def _deliver_direct(self, event: dict[str, object]) -> None:
        sessions = self._by_user.get(str(event["to"]))
        if not sessions:
            return
        origin = event.get("session")
        frame = text_frame(
            encode(
                "direct",
                id=event["id"],
                data=event["data"],
                ts=event["ts"],
                **{"from": event["from"]},
            )
        )
        self._fan_out("direct", sessions, origin, frame)

    def _fan_out(self, kind: str, sessions: set[Session], origin: object, frame: bytes) -> None:
        """Deliver ``frame`` to every one of ``sessions`` but the one it came from."""
        delivered = 0
        for session in list(sessions):  # a delivery may close a session, and so change the set
            if session.id != origin:
                delivered += session.deliver(frame, self._cork)
        self.metrics.fanout(kind, delivered)

    def _logout(self, event: dict[str, object]) -> None:
        user_id = str(event["user_id"])
        self.forget_auth(user_id)
        reason = str(event.get("reason", "logout"))
        code = LOGOUT_CLOSE_CODES.get(reason, 4000)
        only = event.get("session_id")
        closed = 0
        for session in list(self._by_user.get(user_id, ())):
            if only is None or session.id == only:
                closed += not session.closing
                session.close(code, reason, encode("logout", reason=reason))
        if (request := event.get("request")) is not None and (to := event.get("reply_to")):
            ack = {"type": "logout_ack", "request": request, "closed": closed}
            try:
                self._acks.send_nowait((keys.control_channel(str(to)), dumps(ack)))
            except trio.WouldBlock:
                logger.warning("logout acknowledgements backlog full; one dropped")

    async def _send_acks(self) -> None:
        async for channel, payload in self._acks_out:
            batch = Batch()
            batch.publish(channel, payload)
            try:
                await self.backend.execute(batch)
            except BackendUnavailable as exc:
                logger.warning("could not acknowledge a logout: %s", exc)

    # --- the application's listeners -------------------------------------------------------------

    @asynccontextmanager
    async def listen(self, room: str) -> AsyncIterator[AsyncIterator[dict[str, object]]]:
        """Every message of ``room`` this instance hands out, from now on, as ``message``
        frames (dicts), in the order members get them: the catch-up after a Pub/Sub drop
        included, nothing twice (SPEC §14 ``server.listen``).

        Raises:
            BackendUnavailable: the room's channel could not be subscribed.
            SlowListener: (from the iterator) it fell :data:`LISTEN_BUFFER` messages behind.
        """
        listener = _Listener()
        self._listeners.setdefault(room, set()).add(listener)
        try:
            await self._subscribe(room)
            yield listener
        finally:
            listener.close()
            listeners = self._listeners[room]
            listeners.discard(listener)
            if not listeners:
                del self._listeners[room]
                if room not in self._by_room and not self._needed(room):
                    with trio.move_on_after(self.config.redis.command_timeout, shield=True):
                        await self.release_rooms([room])

    # --- operations that need every instance -----------------------------------------------------

    async def logout(
        self, user_id: str, reason: str, *, session_id: str | None = None, wait: float = 1.0
    ) -> int:
        """Publish ``auth:logout`` and count the sessions closed, from every instance's
        acknowledgement received within ``wait`` seconds.

        Raises:
            BackendUnavailable: the logout could not be published.
        """
        request = new_message_id()
        event: dict[str, object] = {"user_id": user_id, "reason": reason}
        if session_id is not None:
            event["session_id"] = session_id
        event.update(request=request, reply_to=self.instance_id)
        waiter = _Acknowledgements()
        self._logout_waiters[request] = waiter
        try:
            batch = Batch()
            listeners = batch.publish(keys.LOGOUT_CHANNEL, dumps(event))
            await self.backend.execute(batch)
            waiter.expect(listeners.value)
            with trio.move_on_after(wait):
                await waiter.complete.wait()
            return waiter.closed
        finally:
            del self._logout_waiters[request]


class SlowListener(ChatError):
    """A ``server.listen`` reader fell too far behind; messages after it were not kept."""


class _Listener:
    """One ``server.listen``: a bounded buffer the pump fills without ever waiting."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[dict[str, object]](LISTEN_BUFFER)
        self.overflowed = False

    def offer(self, room: str, event: dict[str, object]) -> None:
        if self.overflowed:
            return
        frame = {
            "type": "message",
            "id": event["id"],
            "room": room,
            "from": event.get("from"),
            "data": event.get("data"),
            "ts": event.get("ts"),
        }
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            logger.warning(
                "a listener of room %s is %d messages behind: dropped", room, LISTEN_BUFFER
            )
            self.overflowed = True
            self._send.close()

    def __aiter__(self) -> _Listener:
        return self

    async def __anext__(self) -> dict[str, object]:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.overflowed:
                raise SlowListener(
                    f"fell {LISTEN_BUFFER} messages behind; later ones were dropped"
                ) from None
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._send.close()
        self._receive.close()


class _Subscribing:
    """A channel waiting for the SUBSCRIBE that holds it; ``error`` set when that failed."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BackendUnavailable | None = None


class _Acknowledgements:
    """Counts the ``logout_ack`` replies to one logout request."""

    def __init__(self) -> None:
        self.closed = 0
        self.received = 0
        self.expected: int | None = None
        self.complete = trio.Event()

    def expect(self, count: int) -> None:
        self.expected = count
        self._check()

    def acknowledge(self, closed: int) -> None:
        self.closed += closed
        self.received += 1
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.received >= self.expected:
            self.complete.set()


class _Hold:
    """A session's live messages of one room while its join reads the stream and answers.

    While the stream is read, every live message is kept. Once the answer (and any replay) is
    written, up to the room's last entry at the time of the read, the kept ones after that
    entry are handed over; if none is, the pump has not passed that entry yet, and live
    messages are dropped until it does (the session has them, or joined after them).
    """

    __slots__ = ("after", "kept")

    def __init__(self) -> None:
        self.kept: list[tuple[StreamId | None, bytes]] | None = []
        self.after: StreamId | None = None

    def offer(self, message_id: StreamId | None, frame: bytes) -> bool:
        """Take a live message; True when it is the first past the replay: deliver it and
        end the hold."""
        if self.kept is not None:
            self.kept.append((message_id, frame))
            return False
        return _after(message_id, self.after)

    def release(self, after: StreamId | None, delivered: StreamId | None) -> list[bytes] | None:
        """The replay is written up to ``after``: the kept frames to hand over (ending the
        hold), or None while the pump (at ``delivered``) has not passed ``after`` yet."""
        kept, self.kept, self.after = self.kept or [], None, after
        later = [frame for message_id, frame in kept if _after(message_id, after)]
        if later or after is None or (delivered is not None and delivered >= after):
            return later
        return None


def _after(message_id: StreamId | None, after: StreamId | None) -> bool:
    # an id that is no stream id cannot have been replayed
    return message_id is None or after is None or message_id > after


def _discard(index: defaultdict[str, set[Session]], key: str, session: Session) -> bool:
    """Remove ``session`` from ``index[key]``; return False when that emptied the entry."""
    members = index.get(key)
    if members is None:
        return False
    members.discard(session)
    if not members:
        del index[key]
        return False
    return True
