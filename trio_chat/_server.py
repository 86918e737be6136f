"""``serve``: the nursery tree of one trio-chat instance (SPEC §1).

serve
├── backend holder                  shielded: the store outlives every cleanup that needs it
└── services nursery                outlives the handlers
    ├── hub.run                     the Pub/Sub pump
    ├── heartbeat                   renews instance and session TTLs every ttl/3
    ├── cleaner                     reaps instances that died without cleaning up
    ├── timers                      token expiry of every session, one task
    ├── pinger                      WebSocket pings of every session, one task (4408)
    ├── serve_admin                 the admin HTTP API (Hypercorn), when admin.enabled
    ├── watchdog                    systemd WATCHDOG=1 while healthy (under systemd)
    └── handlers nursery            outlives the accept loop
        ├── connection x N          one task per socket (+ a writer while it has a backlog)
        └── front nursery           cancelled first at shutdown
            ├── WebSocketServer     the accept loop
            └── signal watcher      SIGTERM/SIGINT -> drain (when asked to)
"""

from __future__ import annotations

import logging
import signal
import ssl
from functools import partial
from typing import TYPE_CHECKING

import attrs
import trio
from trio_websocket import WebSocketServer

from . import _reaper as reaper
from . import _registry as registry
from ._auth import TokenVerifier
from ._config import tls_context
from ._connection import CLEANUP_TIMEOUT, ConnectionHandler
from ._errors import BackendUnavailable
from ._hooks import check_hooks, open_hooks
from ._hub import Hub
from ._jwks import Jwks
from ._messages import DEFAULT_HISTORY_PAGE, JSONValue
from ._metrics import Metrics
from ._operations import Operator
from ._session import GOING_AWAY
from ._store.backends import open_backend
from ._store.cluster import ClusterBackend
from ._store.interface import Backend, Batch
from ._web.admin import serve_admin

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from contextlib import AbstractAsyncContextManager

    from ._config import Config
    from ._systemd import Notifier

logger = logging.getLogger(__name__)


@attrs.frozen
class Server:
    """What ``nursery.start(serve, config)`` returns once the instance is listening: where it
    listens, and the embedding API (SPEC §14), the admin API's operations as methods, on the
    same code path as ``/v1``. Errors: :class:`ValueError` (``InvalidArgument``) for a bad
    argument, :class:`BackendUnavailable` when the store cannot be reached."""

    #: the bound WebSocket port (useful with ``server.port = 0``)
    host: str
    port: int
    path: str
    instance_id: str
    #: the bound admin API port; None when ``admin.enabled`` is false
    admin_port: int | None = None
    admin_host: str = "127.0.0.1"
    _operator: Operator | None = attrs.field(default=None, repr=False, eq=False, alias="operator")
    #: the WebSocket listener speaks TLS (``server.tls_cert``): ``wss://``
    tls: bool = False
    #: the admin listener speaks TLS (``admin.tls_cert``): ``https://``
    admin_tls: bool = False

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to."""
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}{self.path}"

    @property
    def admin_url(self) -> str | None:
        """The admin API's base URL, or None when it is disabled."""
        if self.admin_port is None:
            return None
        host = f"[{self.admin_host}]" if ":" in self.admin_host else self.admin_host
        return f"{'https' if self.admin_tls else 'http'}://{host}:{self.admin_port}"

    @property
    def _ops(self) -> Operator:
        if self._operator is None:
            raise RuntimeError("this Server was not returned by serve()")
        return self._operator

    async def publish(self, room: str, data: JSONValue, *, sender: str | None = None) -> str:
        """Publish ``data`` to ``room`` as the server, or as user ``sender`` (a bot): members
        get a ``message`` with ``from`` = ``sender`` (null without one) and ``session`` null.
        The ``send`` hook is not asked. Returns the message id."""
        answer = await self._ops.publish(room, data, sender=sender)
        return str(answer["id"])

    async def direct(self, user: str, data: JSONValue, *, sender: str | None = None) -> str:
        """Send ``data`` to every session of ``user`` as a ``direct``; returns its id."""
        answer = await self._ops.direct(user, data, sender=sender)
        return str(answer["id"])

    async def logout(self, user: str) -> int:
        """Revoke the user's tokens so far and close its sessions everywhere; returns how many
        closed (as acknowledged within a second)."""
        return int((await self._ops.logout(user))["closed"])

    async def ban(self, user: str) -> int:
        """Ban the user and close its sessions everywhere; returns how many closed."""
        return int((await self._ops.ban(user))["closed"])

    async def unban(self, user: str) -> None:
        """Let a banned user in again."""
        await self._ops.unban(user)

    async def mute(self, user: str, seconds: float) -> int:
        """Refuse the user's sends for ``seconds``; returns ``muted_until`` (unix s)."""
        return int((await self._ops.mute(user, seconds))["muted_until"])

    async def kick(self, session: str) -> int | None:
        """Close one session wherever it is; returns 1 or 0 closed, None for no such session."""
        answer = await self._ops.kick(session)
        return None if answer is None else int(answer["closed"])

    async def sessions(self, user: str) -> list[dict[str, object]]:
        """The user's live sessions, as ``GET /v1/users/<uid>/sessions`` lists them."""
        return list((await self._ops.sessions(user))["sessions"])

    async def presence(self, room: str) -> dict[str, object]:
        """``{room, sessions, users}`` of the room, as ``GET /v1/rooms/<room>/presence``."""
        return await self._ops.presence(room)

    async def history(
        self, room: str, *, before: str | None = None, limit: int = DEFAULT_HISTORY_PAGE
    ) -> dict[str, object]:
        """``{room, messages, more}``: a page of the room's history, oldest first."""
        return await self._ops.history(room, before=before, limit=limit)

    async def instances(self) -> list[dict[str, object]]:
        """Every instance of the deployment, as ``GET /v1/instances`` lists them."""
        return list((await self._ops.instances())["instances"])

    async def rooms(self, limit: int = 100) -> list[dict[str, object]]:
        """The rooms with a live member on any instance, most users first, as
        ``GET /v1/rooms`` lists them (SPEC §15)."""
        return list((await self._ops.rooms(limit))["rooms"])

    def listen(self, room: str) -> AbstractAsyncContextManager[AsyncIterator[dict[str, object]]]:
        """``async with server.listen(room) as messages: async for message in messages``:
        every ``message`` of the room this instance hands out from now on, from any instance,
        in id order, with the catch-up after a Pub/Sub drop (nothing missed, nothing twice).
        Raises ``SlowListener`` from the iterator if it falls 1,000 messages behind."""
        return self._ops.listen(room)


async def serve(
    config: Config,
    *,
    hooks: object | None = None,
    handle_signals: bool = False,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one trio-chat instance until cancelled (or, with ``handle_signals``, SIGTERM/SIGINT).

    ``task_status.started()`` reports a :class:`Server` once the store is connected, the Pub/Sub
    pump is subscribed and the listener is bound.

    Shutdown, by SIGTERM/SIGINT: stop accepting, ask every socket to close with 1001, give the
    connections ``server.shutdown_timeout`` seconds, then remove the instance's records and
    return. Cancellation from outside skips the polite close, but every connection still
    removes its session records in a shielded, bounded ``finally``.

    Args:
        config: the whole configuration.
        hooks: the application's hooks (SPEC §14): an object with any of the async methods
            ``connect``, ``join``, ``send``, ``direct``, ``disconnect``; not with ``hooks.url``.
        handle_signals: install SIGTERM/SIGINT handlers (main thread only); embedders that
            handle signals themselves leave it False and cancel instead.
        notifier: tell systemd READY=1 once listening, STOPPING=1 when the drain begins, and
            feed its watchdog (the CLI passes ``Notifier.from_environ()``).

    Raises:
        ConfigError: the auth configuration cannot verify any token, or the hooks are
            misconfigured.
        BackendUnavailable: the store is unreachable at start-up.
    """
    auth = config.auth
    jwks = None
    if auth.jwks_url is not None:
        jwks = Jwks(
            auth.jwks_url,
            auth.jwt_algorithms,
            refresh=auth.jwks_refresh,
            min_refetch=auth.jwks_min_refetch,
        )
    verifier = TokenVerifier(auth, jwks)
    check_hooks(config, hooks)
    instance_id = config.server.instance_id
    async with trio.open_nursery() as root:
        release = trio.Event()
        backend: Backend = await root.start(_hold_backend, config, release)
        metrics = Metrics()
        hub = Hub(config, backend, metrics)
        hub.jwks = jwks
        metrics.bind_hub(hub)
        if isinstance(backend, ClusterBackend):
            metrics.bind_cluster(backend)
        try:
            # the hooks' HTTP client outlives the connections: their disconnect hook needs it
            async with (
                open_hooks(config, hooks, metrics) as caller,
                trio.open_nursery() as services,
            ):
                await services.start(hub.run)
                if jwks is not None:  # its first fetch goes on in the background: 503 until then
                    await services.start(jwks.run)
                handler = ConnectionHandler(config, hub, verifier, caller)
                await _serve_connections(
                    config, hub, handler, services, handle_signals, notifier, task_status
                )
                services.cancel_scope.cancel()
        finally:
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                try:
                    await hub.flush_cleanups()
                except BackendUnavailable as exc:
                    logger.warning("session cleanups still failing: %s", exc)
                batch = Batch()
                # Sessions we could not remove are left for a peer's reaper to find.
                registry.remove_instance(batch, instance_id, leave_to_reaper=hub.cleanups_pending)
                try:
                    await backend.execute(batch)
                except BackendUnavailable as exc:
                    logger.warning("could not remove instance records: %s", exc)
            release.set()
    logger.info("instance %s stopped", instance_id)


async def _hold_backend(
    config: Config, release: trio.Event, *, task_status: trio.TaskStatus[Backend]
) -> None:
    """Keep the store open, shielded, until ``release`` is set.

    Cancelling ``serve`` cancels every task under it at once; the store's own connection tasks
    must outlive the connections' shielded cleanup, which still needs them.
    """
    with trio.CancelScope(shield=True):
        async with open_backend(
            config.redis.url, command_timeout=config.redis.command_timeout
        ) as backend:
            task_status.started(backend)
            await release.wait()


async def _cancel_on_signal(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Cancel ``scope`` on SIGTERM or SIGINT; started once the handlers are installed."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            logger.info("received %s: draining", signal.Signals(signum).name)
            scope.cancel()
            return


async def _serve_connections(
    config: Config,
    hub: Hub,
    handler: ConnectionHandler,
    services: trio.Nursery,
    handle_signals: bool,
    notifier: Notifier | None,
    task_status: trio.TaskStatus[Server],
) -> None:
    """Accept until cancelled or signalled, then drain the connections (1001, deadline)."""
    server = config.server
    tls = None
    if server.tls_cert is not None and server.tls_key is not None:
        tls = tls_context(server.tls_cert, server.tls_key)
    scheme = "ws" if tls is None else "wss"
    async with trio.open_nursery() as handlers:
        try:
            async with trio.open_nursery() as front:
                listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
                listeners = await _listen(config)
                if tls is not None:
                    listeners = [trio.SSLListener(tcp, tls) for tcp in listeners]
                ws_server = await front.start(
                    WebSocketServer(
                        handler,
                        listeners,
                        handler_nursery=handlers,
                        max_message_size=config.limits.max_message_bytes,
                        connect_timeout=config.server.handshake_timeout,
                        disconnect_timeout=CLEANUP_TIMEOUT,
                    ).run
                )
                port = ws_server.port
                batch = Batch()
                registry.write_instance(batch, config, port)
                await hub.backend.execute(batch)
                services.start_soon(registry.heartbeat, hub, port)
                services.start_soon(hub.timers.run)
                services.start_soon(hub.ping_sessions)
                services.start_soon(reaper.cleaner, hub.backend, config)
                # Among the services, so /readyz still answers (503, draining) while the
                # connections drain, for the load balancer's sake.
                admin_port: int | None = None
                bound_url = f"{scheme}://{config.server.host}:{port}{config.server.path}"
                public_url = config.server.public_url or bound_url
                if config.admin.enabled:
                    admin_port = await services.start(
                        partial(serve_admin, metrics=hub.metrics.render, ws_url=public_url),
                        config,
                        hub,
                    )
                if handle_signals:
                    # before READY=1: a SIGTERM right after it must drain, not kill
                    await front.start(_cancel_on_signal, front.cancel_scope)
                    front.start_soon(_reload_on_sighup, tls, server.tls_cert, server.tls_key)
                logger.info(
                    "instance %s listening on %s (store %s)",
                    hub.instance_id,
                    bound_url,
                    hub.backend.url,
                )
                task_status.started(
                    Server(
                        config.server.host,
                        port,
                        config.server.path,
                        hub.instance_id,
                        admin_port,
                        config.admin.host,
                        operator=Operator(hub),
                        tls=tls is not None,
                        admin_tls=config.admin.tls_cert is not None,
                    )
                )
                if notifier is not None:
                    # The watchdog is fed only while the pump (and so Redis) is healthy.
                    services.start_soon(notifier.keep_alive, lambda: hub.pump_healthy)
                    await notifier.ready(f"listening on {bound_url}")
        finally:
            # The accept loop is gone, so no new handshake can arrive. Ask the open sockets
            # to close themselves with 1001 (a cancelled handler would leave clients 1006),
            # and give them a deadline.
            hub.draining = True
            if notifier is not None:
                await notifier.stopping("draining")  # shielded and bounded inside
            hub.close_all(GOING_AWAY, "server shutting down")
            # Keep back time for the cleanups that follow: each connection's records, then the
            # instance's, one bounded round trip each, so the whole drain fits the timeout.
            timeout = config.server.shutdown_timeout
            drain = max(timeout / 2, timeout - 3 * config.redis.command_timeout)
            handlers.cancel_scope.deadline = trio.current_time() + drain


async def _reload_on_sighup(
    context: ssl.SSLContext | None, cert: str | None, key: str | None
) -> None:
    """Load ``cert`` and ``key`` into ``context`` again on each SIGHUP: handshakes from then on
    present the new certificate, and the connections made before keep theirs (a rotation
    drops nobody). A pair that cannot be loaded is logged, and the old one kept. Without TLS
    there is nothing to reload, and SIGHUP (``systemctl reload``) still stops nothing."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            if context is None or cert is None or key is None:
                logger.info("SIGHUP: nothing to reload (no server.tls_cert)")
                continue
            try:
                context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                logger.error("SIGHUP: TLS certificate not reloaded, the old one stays: %s", exc)
            else:
                logger.info("SIGHUP: TLS certificate reloaded from %s", cert)


async def _listen(config: Config) -> list[trio.SocketListener]:
    """Bind the WebSocket listeners; with ``server.reuse_port``, so that workers share them."""
    if not config.server.reuse_port:
        return await trio.open_tcp_listeners(config.server.port, host=config.server.host)
    listeners = []
    for family, kind, proto, _, address in await trio.socket.getaddrinfo(
        config.server.host, config.server.port, type=trio.socket.SOCK_STREAM
    ):
        sock = trio.socket.socket(family, kind, proto)
        try:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
            await sock.bind(address)
            sock.listen(4096)
        except OSError:
            sock.close()
            raise
        listeners.append(trio.SocketListener(sock))
    return listeners
