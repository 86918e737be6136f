"""One WebSocket connection from upgrade request to cleanup (SPEC §5, §6, §8).

The handshake authenticates and registers the session, or refuses with an HTTP status and a
JSON body. After the upgrade, the read loop turns each client frame into a reply queued on the
session; Pub/Sub traffic arrives through the hub. Whatever ends the connection, the
session's records are removed in a shielded, time-bounded ``finally``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from functools import partial
from typing import TYPE_CHECKING, Any, assert_never

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from ._auth import (
    REFUSALS,
    SUBPROTOCOL,
    AuthRecord,
    HandshakeInfo,
    Identity,
    TokenVerifier,
    find_token,
    judge,
    opaque_session_id,
    origin_allowed,
)
from ._errors import AuthError, BackendUnavailable, ProtocolError
from ._hooks.caller import HookDenied, HookFailed
from ._hooks.events import (
    KEEP,
    Allow,
    ConnectEvent,
    DirectEvent,
    DisconnectEvent,
    Event,
    JoinEvent,
    SendEvent,
)
from ._limits import ABUSE_STRIKES, TokenBucket
from ._logging import log_event
from ._messages import (
    BAD_REQUEST,
    FORBIDDEN,
    INTERNAL,
    MUTED,
    NOT_IN_ROOM,
    RATE_LIMITED,
    ROOM_FULL,
    ROOM_ID,
    TOO_LARGE,
    UNAVAILABLE,
    ClientMessage,
    Direct,
    History,
    Join,
    JSONValue,
    Leave,
    Ping,
    Presence,
    Read,
    Receipts,
    Refresh,
    Send,
    Signal,
    dumps,
    encode,
    error_frame,
    is_user_id,
    new_message_id,
    new_session_id,
    now_ms,
    parse_client_message,
    room_message,
)
from ._operations import direct_payload, room_history, room_users, route_direct
from ._outbox import Outbox, Outgoing, OutgoingRead, OutgoingSignal, Pending
from ._registry import depart, enter, remove_session, write_rooms, write_session
from ._rooms import read as room_read
from ._rooms import signal as room_signal
from ._session import INTERNAL_ERROR, POLICY, CloseRequest, Session
from ._store import keys
from ._store.cluster import ClusterBackend
from ._store.history import ID_BYTES, format_id, message_frame, parse_id, recover
from ._store.interface import Batch
from ._wire import forget_handshake

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from trio_websocket import WebSocketConnection

    from ._config import Config
    from ._hooks.caller import HookCaller
    from ._hub import Hub

logger = logging.getLogger(__name__)

#: how long cleanup I/O may take once a connection is over
CLEANUP_TIMEOUT = 5.0
TOKEN_EXPIRED_CLOSE = 4401
RATE_LIMIT_CLOSE = 4429
MESSAGE_TOO_BIG = 1009
#: unparseable frames in a row after which the client is closed with 1008
MALFORMED_STRIKES = 10
#: frames read ahead while a hook runs; beyond, the socket is read no further until it ends
READ_AHEAD = 32
#: the largest ``data`` of a ``signal``, in bytes of JSON (SPEC §15)
MAX_SIGNAL_BYTES = 1024
#: the longest ``read`` id of a room without history (ids are then opaque strings)
MAX_MESSAGE_ID_BYTES = 128


class SessionEnded(Exception):
    """A frame ended the session (revoked, banned, abusive...).

    With ``close``, the read loop closes the session that way once the acks of the sends
    before that frame are out; without, the session was closed already.
    """

    def __init__(self, why: str, close: CloseRequest | None = None) -> None:
        super().__init__(why)
        self.close = close


class ConnectionHandler:
    """Handles every upgrade request of one server; one call per connection.

    Args:
        config: the server configuration.
        hub: this instance's hub; it must outlive every call.
        verifier: the JWT verifier built from ``config.auth``.
    """

    def __init__(
        self, config: Config, hub: Hub, verifier: TokenVerifier, hooks: HookCaller | None = None
    ) -> None:
        self.config = config
        self.hub = hub
        self.backend = hub.backend
        # a failover of a Redis Cluster can fork a room's history (_store.history.recover)
        self._forks = isinstance(hub.backend, ClusterBackend)
        self.verifier = verifier
        self._proxies = [
            ipaddress.ip_network(entry, strict=False) for entry in config.server.trusted_proxies
        ]
        self.metrics = hub.metrics
        #: the application's hooks (SPEC §14); None: nothing is asked
        self.hooks = hooks

    async def __call__(self, request: WebSocketRequest) -> None:
        """Authenticate, register, serve and clean up one connection.

        Never raises (but Cancelled): an unexpected error closes the socket with 1011 and is
        logged, and the session's records are removed all the same.
        """
        with self.metrics.connection():
            try:
                await self._serve(request)
            except Exception:
                # A bug must cost one connection, never the server: trio-websocket would pass
                # it up to the handlers' nursery, and that would cancel every connection.
                logger.exception("connection handler failed")

    async def _serve(self, request: WebSocketRequest) -> None:
        remote = _remote(request, self._proxies)
        try:
            info = HandshakeInfo.from_request(
                request.path, request.headers, request.proposed_subprotocols
            )
            if info.path != self.config.server.path:
                raise AuthError(404, "not_found", "no WebSocket endpoint here")
            identity, claims, record, stamp = await self._authenticate(info)
            session_id = new_session_id()
            allowed = await self._ask_connect(session_id, identity, claims, remote)
            del claims
        except AuthError as exc:
            log_event(
                logger,
                logging.INFO,
                "refused",
                remote=remote,
                instance=self.hub.instance_id,
                status=exc.status,
                code=exc.code,
                reason=exc.message,
            )
            self.metrics.handshake(exc.code)
            await _reject(request, exc)
            return
        except Exception:
            # e.g. a key of the wrong type in Redis, written by another service
            logger.exception("refused %s: handshake failed", remote)
            self.metrics.handshake("internal")
            await _reject(request, AuthError(500, "internal", "internal error"))
            return

        session: Session | None = None
        registered = False
        try:
            connected_at = now_ms()
            try:
                public = allowed.info if allowed is not None else None
                await self._register(session_id, identity, remote, connected_at, public)
                registered = True
            except BackendUnavailable as exc:
                log_event(
                    logger,
                    logging.WARNING,
                    "refused",
                    remote=remote,
                    instance=self.hub.instance_id,
                    status=503,
                    code="unavailable",
                    reason=f"redis unreachable at registration: {exc}",
                )
                self.metrics.handshake("unavailable")
                await _reject(request, AuthError(503, "unavailable", "store unreachable"))
                return
            subprotocol = SUBPROTOCOL if SUBPROTOCOL in info.subprotocols else None
            del info  # its headers are not needed for the rest of a long-lived connection
            ws = await request.accept(subprotocol=subprotocol)
            forget_handshake(request)
            self.metrics.handshake("accepted")
            limits = self.config.limits
            session = Session(
                session_id,
                identity,
                ws,
                queue_size=limits.outbound_queue,
                send_bucket=TokenBucket(limits.send_rate, limits.send_burst),
                frame_bucket=TokenBucket(limits.frame_rate, limits.frame_burst),
                remote=remote,
                metrics=self.metrics,
            )
            session.connected_at_ms = connected_at
            session.info = public
            session.reply(
                encode(
                    "welcome",
                    session_id=session_id,
                    user_id=identity.user_id,
                    instance=self.hub.instance_id,
                    expires_at=identity.expires_at,
                    heartbeat=self.config.heartbeat.ping_interval,
                    info=session.info,
                )
            )
            self.hub.add(session)
            self.hub.remember_auth(identity.user_id, record, stamp)
            log_event(
                logger,
                logging.INFO,
                "connected",
                user=identity.user_id,
                session=session_id,
                instance=self.hub.instance_id,
                remote=remote,
            )
            if self.hub.draining:
                session.close(1001, "server shutting down")
            self._schedule_expiry(session)
            rooms = allowed.rooms if allowed is not None else ()
            await session.serve(
                partial(self._read_loop, rooms=rooms), close_timeout=CLEANUP_TIMEOUT
            )
        except (ConnectionClosed, trio.BrokenResourceError):
            pass  # the client went away during the upgrade or the close
        except Exception:
            logger.exception("session %s crashed", session_id)
            if session is not None:
                with trio.move_on_after(1, shield=True):
                    await session.ws.aclose(INTERNAL_ERROR, "internal error")
        finally:
            rooms_left = tuple(sorted(session.rooms)) if session is not None else ()
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                await self._unregister(session_id, identity.user_id, session)
                if registered and self.hooks is not None:
                    why = disconnect_reason(session.close_request if session else None)
                    event = DisconnectEvent(
                        user=identity.user_id, session=session_id, reason=why, rooms=rooms_left
                    )
                    await self.hooks.notify(event)
            reason = session.close_request.reason if session and session.close_request else "closed"
            log_event(
                logger,
                logging.INFO,
                "disconnected",
                user=identity.user_id,
                session=session_id,
                instance=self.hub.instance_id,
                reason=reason,
            )

    # --- handshake -----------------------------------------------------------------------------

    async def _authenticate(
        self, info: HandshakeInfo
    ) -> tuple[Identity, dict[str, Any] | None, AuthRecord | None, tuple[float, int]]:
        """The identity the request's credential proves, its JWT claims (None for an opaque
        session id), and the user's ``auth:<uid>`` as read from ``stamp`` on
        (:meth:`Hub.remember_auth`), once nothing refuses the connection."""
        config = self.config
        if self.hub.draining:
            raise AuthError(503, "draining", "server is shutting down")
        if len(self.hub.sessions) >= config.limits.max_connections:
            raise AuthError(429, "too_many_connections", "instance connection limit reached")
        if not origin_allowed(info, config.auth):
            raise AuthError(403, "origin_not_allowed", "origin not allowed")
        token = find_token(info, config.auth)
        if token is None:
            raise AuthError(401, "missing_token", "no credential in the request")
        claims = None
        if (opaque := opaque_session_id(token, config.auth)) is not None:
            identity = await self._resolve_session(opaque)
        else:
            identity, claims = await self.verifier.verify_claims(token)
        batch = Batch()
        record_fields = batch.hgetall(keys.auth(identity.user_id))
        live_sessions = batch.scard(keys.user_sessions(identity.user_id))
        stamp = self.hub.auth_stamp()
        try:
            await self.backend.execute(batch)
        except BackendUnavailable as exc:
            raise AuthError(503, "unavailable", "store unreachable") from exc
        record = AuthRecord.from_hash(record_fields.value) if record_fields.value else None
        if (
            refusal := judge(record, identity, require_record=config.auth.require_record)
        ) is not None:
            status, code, _, _ = REFUSALS[refusal]
            raise AuthError(status, code, f"user {refusal.replace('_', ' ')}")
        if live_sessions.value >= config.limits.max_sessions_per_user:
            raise AuthError(429, "too_many_sessions", "session limit for this user reached")
        return identity, claims, record, stamp

    async def _ask_connect(
        self, session_id: str, identity: Identity, claims: dict[str, Any] | None, remote: str
    ) -> Allow | None:
        """The application's word on a verified client (SPEC §14): None without a connect hook.

        Raises:
            AuthError: 403 ``forbidden`` when it refuses, 503 ``hooks_unavailable`` when it
                cannot be asked.
        """
        if self.hooks is None or "connect" not in self.hooks:
            return None
        event = ConnectEvent(
            user=identity.user_id,
            session=session_id,
            claims=claims,
            remote=remote,
            instance=self.hub.instance_id,
        )
        try:
            return await self.hooks.decide("connect", event)
        except HookDenied as exc:
            raise AuthError(403, "forbidden", str(exc)) from None
        except HookFailed:
            raise AuthError(503, "hooks_unavailable", "the application did not answer") from None

    async def _resolve_session(self, session_id: str) -> Identity:
        """Look an opaque session id up in ``auth.session_key`` (SPEC §5).

        The hash must hold ``user_id``; ``issued_at`` (unix s) is optional, and without it
        ``not_before`` cannot revoke the session (deleting the key does). The key's TTL, if
        any, is the session's expiry.
        """
        assert self.config.auth.session_key is not None
        key = self.config.auth.session_key.replace("<id>", session_id)
        batch = Batch()
        fields = batch.hgetall(key)
        ttl = batch.ttl(key)
        try:
            await self.backend.execute(batch)
        except BackendUnavailable as exc:
            raise AuthError(503, "unavailable", "store unreachable") from exc
        user_id = fields.value.get("user_id", "")
        if not is_user_id(user_id):
            raise AuthError(401, "invalid_session", "unknown or expired session")
        now = int(time.time())
        try:
            issued_at = int(float(fields.value.get("issued_at") or now))
        except ValueError:
            issued_at = now
        expires_at = None if ttl.value is None else now + math.ceil(ttl.value)
        return Identity(user_id, issued_at, expires_at)

    async def _register(
        self,
        session_id: str,
        identity: Identity,
        remote: str,
        connected_at: int,
        info: Mapping[str, JSONValue] | None,
    ) -> None:
        """Write the session's records in one round trip (SPEC §5)."""
        batch = Batch()
        write_session(
            batch,
            self.config,
            session_id,
            identity,
            remote=remote,
            connected_at=connected_at,
            rooms=(),
            info=info,
        )
        await self.backend.execute(batch)

    async def _unregister(self, session_id: str, user_id: str, session: Session | None) -> None:
        emptied: list[str] = []
        rooms: set[str] = set()
        if session is not None:
            if session.expiry_timer is not None:
                session.expiry_timer.cancel()
            rooms = set(session.rooms)
            emptied = self.hub.discard(session)
        batch = Batch()
        depart(batch, self.config, self.hub.rooms, session_id, user_id, sorted(rooms))
        remove_session(batch, self.hub.instance_id, session_id, user_id)
        try:
            await self.backend.execute(batch)
        except BackendUnavailable as exc:
            logger.warning("cleanup of session %s failed, will retry: %s", session_id, exc)
            self.hub.retry_cleanup(batch)
        except Exception:
            # e.g. a key of the wrong type; the TTLs and the reaper are the backstop
            logger.exception("cleanup of session %s failed", session_id)
        if emptied and not self.hub.draining:  # at shutdown the whole subscription goes
            await self.hub.release_rooms(emptied)

    # --- frames --------------------------------------------------------------------------------

    async def _read_loop(self, session: Session, *, rooms: Sequence[str] = ()) -> None:
        """Answer the session's frames in order, after joining the connect hook's ``rooms``."""
        for room in rooms:
            if not await self._auto_join(session, room):
                return
        receive = session.ws.get_message
        if self.hooks is not None:
            # A hook may take a while: a task of the session reads on meanwhile, so that pongs
            # and a close are still seen (a slow hook must not cost the client a 4408).
            frames = _ReadAhead()
            if not session.start_soon(partial(frames.fill, session.ws)):
                return
            receive = frames.receive
        outbox = Outbox(
            session,
            self.backend,
            self.metrics,
            self.hub.rooms,
            settle=2 * self.config.redis.command_timeout,
        )
        max_bytes = self.config.limits.max_message_bytes
        malformed = 0  # frames in a row that could not be parsed at all
        while not session.closing:
            try:
                raw = await receive()
            except ConnectionClosed:
                # The client is gone, but what it sent before it left still goes out.
                with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                    await outbox.wait_idle()
                raise
            if _too_big(raw, max_bytes):  # trio-websocket counted characters, not bytes
                await outbox.wait_idle()
                session.close(MESSAGE_TOO_BIG, f"message over {max_bytes} bytes")
                return
            try:
                message = parse_client_message(raw)
            except ProtocolError as exc:
                self.metrics.frame_in(None)
                session.frame_bucket.take()  # a bad frame costs its token too
                malformed += 1
                await outbox.wait_idle()  # the acks of the sends before it come first
                if malformed >= MALFORMED_STRIKES:  # SPEC §7: bad frames after warnings
                    session.close(POLICY, "too many malformed frames", error_frame(exc))
                    return
                session.reply(error_frame(exc))
                continue
            malformed = 0
            self.metrics.frame_in(message)
            try:
                _spend(session.frame_bucket, message.ref)
                if not isinstance(message, Send | Signal | Read):
                    await outbox.wait_idle()  # its reply comes after the acks before it
                outgoing = await self._handle(session, message)
                if outgoing is not None:
                    await outbox.put(outgoing)
            except ProtocolError as exc:
                await outbox.wait_idle()
                session.reply(error_frame(exc))
            except SessionEnded as ended:
                if ended.close is not None:
                    await outbox.wait_idle()
                    session.close(ended.close.code, ended.close.reason, *ended.close.last_frames)
                return

    async def _auto_join(self, session: Session, room: str) -> bool:
        """Join a room the connect hook named, as a ``join`` frame without ``ref`` would, but
        without asking the join hook; a refusal is an ``error`` frame without ``ref``.

        Returns False when that ended the session (a ban meanwhile).
        """
        if not ROOM_ID.fullmatch(room):
            refusal = ProtocolError(BAD_REQUEST, f"room {room[:128]!r} is not a valid room id")
            session.reply(error_frame(refusal))
            return True
        try:
            await self._handle(session, Join(room), ask=False)
        except ProtocolError as exc:
            session.reply(error_frame(exc))
        except SessionEnded as ended:
            if ended.close is not None:
                session.close(ended.close.code, ended.close.reason, *ended.close.last_frames)
            return False
        return True

    async def _handle(
        self, session: Session, message: ClientMessage, *, ask: bool = True
    ) -> Pending | None:
        """Answer one frame; a ``send``, ``signal`` or ``read`` goes on through the outbox it
        returns to (which acknowledges a send). ``ask``: False for a join the connect hook asked
        for (the join hook is not asked again)."""
        try:
            match message:
                case Send():
                    return await self._send(session, message)
                case Join():
                    await self._join(session, message, ask=ask)
                case Leave():
                    await self._leave(session, message)
                case Direct():
                    await self._direct(session, message)
                case Refresh():
                    await self._refresh(session, message)
                case Ping():
                    session.reply(encode("pong", message.ref))
                case History():
                    await self._history(session, message)
                case Presence():
                    await self._presence(session, message)
                case Signal():
                    return self._signal(session, message)
                case Read():
                    return await self._read(session, message)
                case Receipts():
                    await self._receipts(session, message)
                case _:
                    assert_never(message)
            return None
        except BackendUnavailable as exc:
            logger.warning("session %s: %s failed: %s", session.id, type(message).__name__, exc)
            raise ProtocolError(
                UNAVAILABLE, "store unreachable; not delivered", message.ref
            ) from exc
        except (ProtocolError, SessionEnded, ConnectionClosed):
            raise
        except RecursionError as exc:
            # data nested just under the parser's limit, but deeper for the encoder
            raise ProtocolError(BAD_REQUEST, "'data' is nested too deeply", message.ref) from exc
        except Exception as exc:
            # A bug in one frame's handling must not end the connection, nor leak details.
            logger.exception(
                "session %s: error handling a %s frame", session.id, type(message).__name__
            )
            raise ProtocolError(INTERNAL, "internal error", message.ref) from exc

    async def _authorize(self, session: Session, ref: object, *, speaks: bool) -> None:
        """Check ``auth:<uid>`` before acting for the session (SPEC §6): a ban or a revocation
        ends it; a mute refuses only what ``speaks`` (a muted user may still join and read)."""
        record = await self.hub.auth_record(session.user_id)
        refusal = judge(record, session.identity, require_record=self.config.auth.require_record)
        if refusal is not None:
            _, _, close_code, reason = REFUSALS[refusal]
            raise SessionEnded(
                refusal, CloseRequest(close_code, reason, (encode("logout", reason=reason),))
            )
        if speaks and record is not None and record.muted_until > time.time():
            raise ProtocolError(MUTED, f"muted until {int(record.muted_until)}", ref)

    async def _decide(self, name: str, event: Event, ref: JSONValue) -> Allow:
        """Ask hook ``name``; a refusal is ``forbidden`` with its reason, a failure
        ``unavailable`` (SPEC §14)."""
        assert self.hooks is not None
        try:
            return await self.hooks.decide(name, event)
        except HookDenied as exc:
            raise ProtocolError(FORBIDDEN, str(exc), ref) from None
        except HookFailed:
            raise ProtocolError(
                UNAVAILABLE, "the application's hooks are unavailable; not done", ref
            ) from None

    async def _join(self, session: Session, message: Join, *, ask: bool = True) -> None:
        """Join, and with ``since`` replay what the client missed (SPEC §11).

        With history, a first join or a replay holds the room's live messages for the
        session from before the stream is read until the answer is written; the hub then
        hands over those that followed the stream's last entry. ``joined`` names that entry
        (``last``): the client gets every message after it, and can rejoin with it as
        ``since`` even if nothing was said before its connection dropped. It also carries the
        user's read marker and how many messages follow it (SPEC §15).
        """
        room = message.room
        policy = self.hub.rooms(room)
        history = policy.history
        since = None
        if message.since is not None and history.size:
            if (since := parse_id(message.since)) is None:
                raise ProtocolError(BAD_REQUEST, "'since' must be a message id", message.ref)
        new = room not in session.rooms
        if new:
            if not session.identity.may_join(room):
                raise ProtocolError(FORBIDDEN, "your token does not allow this room", message.ref)
            if len(session.rooms) >= self.config.limits.max_rooms_per_session:
                raise ProtocolError(FORBIDDEN, "too many rooms for one session", message.ref)
            await self._authorize(session, message.ref, speaks=False)
            if policy.max_members:
                await self._check_room_size(session, room, policy.max_members, message.ref)
        publish = True
        if new and ask and self.hooks is not None and "join" in self.hooks:
            event = JoinEvent(
                user=session.user_id, session=session.id, room=room, info=session.info
            )
            publish = (await self._decide("join", event, message.ref)).publish
        hold = bool(history.size) and (new or since is not None)
        if new or hold:
            await self.hub.join(session, room, hold=hold)
        batch = Batch()
        if new:
            enter(batch, self.config, policy, room, session.id, session.user_id, session.info)
            write_rooms(batch, self.hub.instance_id, session.id, session.rooms)
        marker = batch.hget(keys.read_markers(room), session.user_id)
        stream = keys.room_channel(room)
        if history.size:
            # without a marker, every message the stream holds is unread
            everything = batch.count_after(stream, "0-0", history.size)
        if hold:
            last = batch.xrevrange(stream, "+", "-", 1)
        if since is not None:
            first = batch.xrange(stream, "-", "+", 1)
            newest = batch.xrevrange(stream, "+", f"({message.since}", history.size + 1)
            if self._forks:
                exact = format_id(since)
                found = batch.xrange(stream, exact, exact, 1)
        try:
            await self.backend.execute(batch)
        except BackendUnavailable as exc:
            if new:
                await self.hub.leave(session, room)
                if exc.sent:  # it may have entered: the heartbeat sees to it
                    self.hub.unsettled.add((session, room))
            else:
                self.hub.release(session, room, None)  # joined as before, without a replay
            raise
        unread = everything.value if history.size else None
        if unread and marker.value is not None and parse_id(marker.value) is not None:
            counting = Batch()
            after = counting.count_after(stream, marker.value, history.size)
            try:
                await self.backend.execute(counting)
                unread = after.value
            except BackendUnavailable as exc:  # joined all the same: all of them, at most
                logger.warning("session %s: unread not counted: %s", session.id, exc)
        if not publish:
            session.read_only = (session.read_only or set()) | {room}
        read = {"read": marker.value, "unread": unread}
        if not hold:  # history off, or a plain join of a room joined already
            gap = {} if message.since is None else {"recovered": False, "missed": 0}
            session.reply(encode("joined", message.ref, room=room, **gap, **read))
            return
        last_id = last.value[0][0] if last.value else None
        if since is None:
            session.reply(encode("joined", message.ref, room=room, last=last_id, **read))
        else:
            recovery = recover(
                since,
                first.value,
                newest.value,
                history.size,
                found.value if self._forks else None,
            )
            joined = encode(
                "joined",
                message.ref,
                room=room,
                recovered=recovery.recovered,
                missed=len(recovery.missed),
                last=last_id,
                **read,
            )
            missed = [message_frame(room, str(m["id"]), m) for m in recovery.missed]
            session.reply_all([joined, *missed])
        self.hub.release(session, room, parse_id(last_id))

    async def _check_room_size(self, session: Session, room: str, limit: int, ref: object) -> None:
        """``room_full`` when ``room`` has ``limit`` distinct users and the session's user is not
        one of them (SPEC §15: checked, not locked)."""
        batch = Batch()
        mine = batch.hget(keys.room_users(room), session.user_id)
        users = batch.hlen(keys.room_users(room))
        await self.backend.execute(batch)
        if mine.value is None and users.value >= limit:
            raise ProtocolError(ROOM_FULL, f"room {room!r} has {limit} members already", ref)

    async def _history(self, session: Session, message: History) -> None:
        _check_joined(session, message.room, message.ref)
        try:
            history = self.hub.rooms(message.room).history
            messages, more = await room_history(
                self.backend, history, message.room, message.before, message.limit
            )
        except ValueError as exc:
            raise ProtocolError(BAD_REQUEST, str(exc), message.ref) from exc
        reply = encode("history", message.ref, room=message.room, messages=messages, more=more)
        session.reply(reply)

    async def _leave(self, session: Session, message: Leave) -> None:
        room = message.room
        if room in session.rooms:
            if session.read_only:
                session.read_only.discard(room)
            await self.hub.leave(session, room)
            batch = Batch()
            write_rooms(batch, self.hub.instance_id, session.id, session.rooms)
            depart(batch, self.config, self.hub.rooms, session.id, session.user_id, [room])
            try:
                await self.backend.execute(batch)
            except BackendUnavailable as exc:
                # Left locally all the same: the heartbeat departs again (unless it has
                # joined again by then) and writes the session's room list afresh.
                logger.warning("session %s: presence not updated on leave: %s", session.id, exc)
                self.hub.unsettled.add((session, room))
        session.reply(encode("left", message.ref, room=message.room))

    async def _send(self, session: Session, message: Send) -> Outgoing:
        """Check a ``send`` and make its room message; the outbox publishes it and acks."""
        self._check_publish(session, message.room, message.ref)
        _spend(session.send_bucket, message.ref)
        await self._authorize(session, message.ref, speaks=True)
        data = message.data
        if self.hooks is not None and "send" in self.hooks:
            event = SendEvent(
                user=session.user_id, session=session.id, room=message.room, data=data
            )
            if (replaced := (await self._decide("send", event, message.ref)).data) is not KEEP:
                data = replaced
        ts, payload = room_message(message.room, session.user_id, session.id, data)
        self._check_size(payload, message.ref, ID_BYTES)
        return Outgoing(message.room, payload, ts, message.ref)

    def _check_publish(self, session: Session, room: str, ref: object) -> None:
        """What a ``send`` or a ``signal`` to ``room`` needs: to be joined, and allowed to
        speak there by the room, the token and the join hook (SPEC §14, §15)."""
        _check_joined(session, room, ref)
        if not self.hub.rooms(room).client_publish:
            raise ProtocolError(FORBIDDEN, "only the server posts in this room", ref)
        if not session.identity.may_publish(room):
            raise ProtocolError(FORBIDDEN, "your token does not allow posting here", ref)
        if session.read_only and room in session.read_only:
            raise ProtocolError(FORBIDDEN, "read-only membership of this room", ref)

    # --- rooms (SPEC §15) ------------------------------------------------------------------------

    def _signal(self, session: Session, message: Signal) -> OutgoingSignal:
        """Check a ``signal``; the outbox publishes it, in order with the sends. Over its own
        budget it is refused, never closed for (SPEC §15)."""
        room = message.room
        if room in session.rooms and not self.hub.rooms(room).signals:
            raise ProtocolError(FORBIDDEN, "signals are off in this room", message.ref)
        self._check_publish(session, room, message.ref)
        if len(dumps(message.data).encode()) > MAX_SIGNAL_BYTES:
            raise ProtocolError(
                TOO_LARGE, f"signal data over {MAX_SIGNAL_BYTES} bytes", message.ref
            )
        if session.signal_bucket is None:  # made at the first signal: most sessions send none
            limits = self.config.limits
            session.signal_bucket = TokenBucket(limits.signal_rate, limits.signal_burst)
        if not session.signal_bucket.take():
            raise ProtocolError(RATE_LIMITED, "too many signals; slow down", message.ref)
        event = room_signal(room, session.user_id, session.id, message.data)
        return OutgoingSignal(room, event, message.ref)

    async def _read(self, session: Session, message: Read) -> OutgoingRead:
        """Check a ``read``; the outbox moves the marker (and announces it if it moved)."""
        room, message_id = message.room, message.id
        _check_joined(session, room, message.ref)
        history = self.hub.rooms(room).history
        if history.size:
            if (read := parse_id(message_id)) is None:
                raise ProtocolError(BAD_REQUEST, "'id' must be a message id", message.ref)
            if not self.hub.delivered(room, read):  # newer than this instance has seen
                batch = Batch()
                last = batch.xrevrange(keys.room_channel(room), "+", "-", 1)
                await self.backend.execute(batch)
                if not last.value or read > (parse_id(last.value[0][0]) or (0, 0)):
                    raise ProtocolError(
                        BAD_REQUEST, "'id' is newer than the room's last message", message.ref
                    )
        elif len(message_id.encode()) > MAX_MESSAGE_ID_BYTES:
            raise ProtocolError(BAD_REQUEST, "'id' is not a message id", message.ref)
        event = room_read(room, session.user_id, session.id, message_id)
        return OutgoingRead(room, session.user_id, message_id, history, event, message.ref)

    async def _receipts(self, session: Session, message: Receipts) -> None:
        _check_joined(session, message.room, message.ref)
        batch = Batch()
        markers = batch.hgetall(keys.read_markers(message.room))
        await self.backend.execute(batch)
        session.reply(encode("receipts", message.ref, room=message.room, read=markers.value))

    async def _presence(self, session: Session, message: Presence) -> None:
        _check_joined(session, message.room, message.ref)
        users, count = await room_users(self.backend, self.config, message.room)
        fields: dict[str, JSONValue] = {"room": message.room, "users": users, "count": count}
        if count > len(users):
            fields["truncated"] = True
        session.reply(encode("presence", message.ref, **fields))

    async def _direct(self, session: Session, message: Direct) -> None:
        _spend(session.send_bucket, message.ref)
        await self._authorize(session, message.ref, speaks=True)
        data = message.data
        if self.hooks is not None and "direct" in self.hooks:
            event = DirectEvent(user=session.user_id, session=session.id, to=message.to, data=data)
            if (replaced := (await self._decide("direct", event, message.ref)).data) is not KEEP:
                data = replaced
        message_id, ts = new_message_id(), now_ms()
        payload = direct_payload(message_id, message.to, session.user_id, session.id, data, ts)
        self._check_size(payload, message.ref)
        await route_direct(self.backend, message.to, payload)
        session.reply(encode("ack", message.ref, id=message_id, ts=ts))

    def _check_size(self, payload: str, ref: object, extra: int = 0) -> None:
        """Recipients refuse frames over the limit; refuse what would become one (``extra``:
        bytes publishing adds)."""
        if len(payload.encode()) + extra > self.config.limits.max_message_bytes:
            raise ProtocolError(TOO_LARGE, "message too large for recipients", ref)

    async def _refresh(self, session: Session, message: Refresh) -> None:
        """Swap the session's token for a new one of the same user (SPEC §6, §8).

        A refresh refused for any reason ends the session (``expired``, 4401). While one is
        in flight the expiry timer waits for it, so a refresh received before the deadline wins.
        """
        session.refreshes_in_flight += 1
        try:
            try:
                identity = await self.verifier.verify(message.token)
            except AuthError as exc:
                raise self._end_expired(session, message.ref, exc.message) from exc
            if identity.user_id != session.user_id:
                raise self._end_expired(session, message.ref, "token is for another user")
            record = await self.hub.auth_record(identity.user_id)
            if judge(record, identity, require_record=self.config.auth.require_record):
                raise self._end_expired(session, message.ref, "token revoked")
            batch = Batch()
            batch.hset(keys.session(session.id), {"token_exp": str(identity.expires_at)})
            batch.expire(keys.session(session.id), self.config.session.ttl)
            await self.backend.execute(batch)
            session.identity = identity
            self._schedule_expiry(session)
            session.reply(encode("refreshed", message.ref, expires_at=identity.expires_at))
        finally:
            session.refreshes_in_flight -= 1

    def _end_expired(self, session: Session, ref: object, why: str) -> SessionEnded:
        session.close(
            TOKEN_EXPIRED_CLOSE,
            "token expired",
            encode("error", ref, code=FORBIDDEN, message=f"refresh refused: {why}"),
            encode("logout", reason="expired"),
        )
        return SessionEnded("refresh refused")

    # --- watchers ------------------------------------------------------------------------------

    def _schedule_expiry(self, session: Session) -> None:
        """Warn ``token_expiring`` once ``auth.refresh_window`` before the token's expiry, then
        at the deadline (+ leeway) close with ``logout {reason: "expired"}`` and 4401, unless a
        refresh replaced the token meanwhile (it calls this again, replacing the timer). One
        timer per session at a time: idle connections are what an instance holds most of."""
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None
        expires_at = session.identity.expires_at
        if expires_at is None:  # an opaque session with no TTL
            return
        left = expires_at - time.time()
        session.expiry_timer = self.hub.timers.call_later(
            max(0.0, left - self.config.auth.refresh_window), partial(self._warn_expiry, session)
        )

    def _warn_expiry(self, session: Session) -> None:
        expires_at = session.identity.expires_at
        assert expires_at is not None
        session.reply(encode("token_expiring", expires_at=expires_at))
        left = expires_at - time.time()
        session.expiry_timer = self.hub.timers.call_later(
            max(0.0, left + self.config.auth.leeway), partial(self._expire, session)
        )

    def _expire(self, session: Session) -> None:
        if session.refreshes_in_flight:
            # A refresh that arrived in time wins: look again once it has been answered.
            session.expiry_timer = self.hub.timers.call_later(0.05, partial(self._expire, session))
            return
        session.expiry_timer = None
        session.close(TOKEN_EXPIRED_CLOSE, "token expired", encode("logout", reason="expired"))


class _ReadAhead:
    """A session's frames, read by a task of their own into a short queue: while the read loop
    waits for a hook, trio-websocket still reads the socket (pongs, the client's close)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[str | bytes](READ_AHEAD)
        self._closed: ConnectionClosed | None = None

    async def fill(self, ws: WebSocketConnection) -> None:
        async with self._send:
            try:
                while True:
                    await self._send.send(await ws.get_message())
            except ConnectionClosed as exc:
                self._closed = exc

    async def receive(self) -> str | bytes:
        """The next frame; raises ConnectionClosed once the client is gone."""
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise self._closed or ConnectionClosed(None) from None


def disconnect_reason(close: CloseRequest | None) -> str:
    """The ``reason`` of the disconnect hook (SPEC §14) for how a session ended."""
    if close is None:
        return "closed"
    match close.code:
        case 4000:
            return "kicked" if close.reason == "kicked" else "logout"
        case 4403:
            return "banned"
        case 4401:
            return "revoked" if close.reason == "revoked" else "expired"
        case 4408:
            return "timeout"
        case 1001:
            return "shutdown"
        case 1011:
            return "error"
        case 1008 if close.reason == "slow consumer":
            return "slow"
        case _:
            return "policy"


def _check_joined(session: Session, room: str, ref: object) -> None:
    """``not_in_room`` unless the session has joined ``room``."""
    if room not in session.rooms:
        raise ProtocolError(NOT_IN_ROOM, f"join {room!r} first", ref)


def _spend(bucket: TokenBucket, ref: object) -> None:
    """Take a token for a frame: ``rate_limited`` without one; 4429 when that goes on."""
    if bucket.take():
        return
    if bucket.strikes >= ABUSE_STRIKES:
        raise SessionEnded(
            "rate limit", CloseRequest(RATE_LIMIT_CLOSE, "rate limit exceeded repeatedly")
        )
    raise ProtocolError(RATE_LIMITED, "slow down", ref)


def _too_big(raw: str | bytes, limit: int) -> bool:
    """Whether a frame is over ``limit`` bytes of UTF-8 (SPEC §6: sizes are bytes)."""
    if isinstance(raw, bytes):
        return len(raw) > limit
    # a character is at most 4 bytes of UTF-8: most frames are sized without encoding them
    return len(raw) * 4 > limit and len(raw.encode("utf-8", "surrogatepass")) > limit


def _remote(request: WebSocketRequest, proxies: Sequence[Network]) -> str:
    """The peer as ``address:port``; from a trusted proxy, the client it names instead."""
    try:
        remote = request.remote
    except OSError:  # the client reset the connection before we looked (ENOTCONN)
        return "gone"
    if isinstance(remote, str):  # a unix socket
        return remote
    if proxies and (client := forwarded_client(str(remote.address), request.headers, proxies)):
        return client
    return f"{remote.address}:{remote.port}"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def forwarded_client(
    peer: str, headers: Sequence[tuple[bytes, bytes]], proxies: Sequence[Network]
) -> str | None:
    """The client's address by ``X-Forwarded-For``, when ``peer`` is one of ``proxies``.

    Each proxy appends the address it got the request from, so the list is read from the
    right, and the first address that is not a trusted proxy is the client: anything left of
    it was written by the client itself and proves nothing. None when the peer is not trusted,
    the header is missing, or an entry read is not an IP address.
    """
    try:
        if not _trusted(ipaddress.ip_address(peer), proxies):
            return None
    except ValueError:
        return None
    forwarded = b",".join(value for name, value in headers if name.lower() == b"x-forwarded-for")
    hops = [hop.strip() for hop in forwarded.decode("latin-1").split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return None
        if not _trusted(address, proxies):
            return str(address)
    return hops[0] if hops else None  # every hop a proxy of ours: the first one


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, proxies: Sequence[Network]
) -> bool:
    return any(address in network for network in proxies)


async def _reject(request: WebSocketRequest, error: AuthError) -> None:
    body = json.dumps({"error": error.code, "message": error.message}).encode()
    with trio.move_on_after(CLEANUP_TIMEOUT):
        try:
            await request.reject(
                error.status, extra_headers=[(b"content-type", b"application/json")], body=body
            )
        except (ConnectionClosed, trio.BrokenResourceError):
            pass
