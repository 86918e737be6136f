"""Prometheus metrics of one instance, served by the admin API's ``GET /metrics`` (SPEC §9).

A :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`: nothing goes to
the library's global registry, so two servers in one process (as in the tests) keep apart.
The per-frame counters (frames in and out, fan-out) are plain integers in dictionaries made up
front for every known label value, read by a collector of ours at scrape time: an increment is
one dict update, without the lock that each ``prometheus_client`` child takes (all calls come
from trio's one thread). The pump counts a fan-out once per message with its number of
recipients, not once per recipient. Gauges that mirror state the hub already keeps (sessions,
Pub/Sub reconnections) read it when scraped instead of being kept in step by hand.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from ._messages import (
    Direct,
    History,
    Join,
    Leave,
    Ping,
    Presence,
    Read,
    Receipts,
    Refresh,
    Send,
    Signal,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sized
    from types import TracebackType

    from prometheus_client.metrics_core import Metric

    from ._messages import ClientMessage

__all__ = ["CLIENT_FRAME_TYPES", "HANDSHAKE_OUTCOMES", "SERVER_FRAME_TYPES", "Metrics"]

#: the ``type`` of every client frame (SPEC §6); anything else counts as ``invalid``
CLIENT_FRAME_TYPES = (
    "join",
    "leave",
    "send",
    "direct",
    "refresh",
    "ping",
    "history",
    "presence",
    "signal",
    "read",
    "receipts",
)
#: the ``type`` of every server frame (SPEC §6)
SERVER_FRAME_TYPES = (
    "welcome",
    "joined",
    "left",
    "message",
    "direct",
    "ack",
    "pong",
    "refreshed",
    "token_expiring",
    "logout",
    "error",
    "history",
    "presence",
    "presence_join",
    "presence_leave",
    "signal",
    "read",
    "receipts",
)
#: ``accepted`` and every refusal code of the handshake (SPEC §5), bound up front so that each
#: series exists (at 0) from the first scrape
HANDSHAKE_OUTCOMES = (
    "accepted",
    "missing_token",
    "invalid_token",
    "token_expired",
    "token_revoked",
    "invalid_session",
    "not_logged_in",
    "banned",
    "origin_not_allowed",
    "not_found",
    "too_many_connections",
    "too_many_sessions",
    "unavailable",
    "draining",
)
INVALID = "invalid"

_CLIENT_CLASSES: dict[type[object], str] = {
    Join: "join",
    Leave: "leave",
    Send: "send",
    Direct: "direct",
    Refresh: "refresh",
    Ping: "ping",
    History: "history",
    Presence: "presence",
    Signal: "signal",
    Read: "read",
    Receipts: "receipts",
}
# Every server frame starts like this: _messages.encode() puts "type" first, compactly.
_FRAME_PREFIX = '{"type":"'
# A handshake outcome is one of our own codes; anything else must not mint a new series each.
_OUTCOME = re.compile(r"[a-z_]{1,40}")

#: a PUBLISH round trip on a healthy network is well under a millisecond; the command timeout
#: (2 s by default) is the far end
PUBLISH_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
#: publisher's clock to this pump: a PUBLISH, the Pub/Sub hop, and clock skew between hosts
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: hook calls: in-process ones take microseconds, HTTP ones a round trip to the application
HOOK_BUCKETS = (*PUBLISH_BUCKETS, 2.5, 5.0)


class HubLike(Protocol):
    """What :meth:`Metrics.bind_hub` reads from the hub at scrape time."""

    @property
    def sessions(self) -> Sized: ...

    @property
    def reconnects(self) -> int: ...

    @property
    def redis_up(self) -> bool: ...


class ClusterLike(Protocol):
    """What :meth:`Metrics.bind_cluster` reads from a cluster backend at scrape time."""

    @property
    def map_reads(self) -> int: ...

    @property
    def redirections(self) -> int: ...


class Metrics:
    """Every metric of one trio-chat instance, in a registry of its own.

    Plain synchronous calls for trio's thread, from any task; none blocks or does I/O.

    Args:
        process: also export the ``process_*`` (CPU, memory, open fds) and ``python_info``
            collectors. They read ``/proc`` at scrape time only.
    """

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.connections = Gauge(
            "trio_chat_connections",
            "Open WebSocket connections, including those still in their handshake",
            registry=registry,
        )
        self.sessions = Gauge(
            "trio_chat_sessions", "Registered sessions on this instance", registry=registry
        )
        self.handshakes = Counter(
            "trio_chat_handshakes",
            'Handshakes by outcome: "accepted" or the refusal code',
            ["outcome"],
            registry=registry,
        )
        self.frames_in = _CounterFamily(
            "trio_chat_frames_in",
            'Client frames received, by type ("invalid": not JSON or an unknown type)',
            "type",
            (*CLIENT_FRAME_TYPES, INVALID),
        )
        self.frames_out = _CounterFamily(
            "trio_chat_frames_out",
            "Frames handed to client connections (written or queued), by type",
            "type",
            (*SERVER_FRAME_TYPES, INVALID),
        )
        self.fanout_deliveries = _CounterFamily(
            "trio_chat_fanout_deliveries",
            "Frames the Pub/Sub pump handed to local sessions (room messages and directs)",
        )
        for family in (self.frames_in, self.frames_out, self.fanout_deliveries):
            registry.register(family)
        self.publish_seconds = Histogram(
            "trio_chat_publish_seconds",
            "Time of a successful round trip publishing a session's sends (one or a batch)",
            buckets=PUBLISH_BUCKETS,
            registry=registry,
        )
        self.slow_consumer_closes = Counter(
            "trio_chat_slow_consumer_closes",
            "Sessions closed with 1008 because their outbound queue was full",
            registry=registry,
        )
        self.signals_dropped = Counter(
            "trio_chat_signals_dropped",
            "Signals not given to a session whose outbound queue was more than half full",
            registry=registry,
        )
        self.pump_lag_seconds = Histogram(
            "trio_chat_pump_lag_seconds",
            "Room messages: time from the sender's ts to their arrival at this pump",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.hook_calls = Counter(
            "trio_chat_hook_calls",
            'Calls of the application\'s hooks, by hook and result ("allow", "deny", "error")',
            ["hook", "result"],
            registry=registry,
        )
        self.hook_seconds = Histogram(
            "trio_chat_hook_seconds",
            "Time of a call of the application's hooks, failures included",
            ["hook"],
            buckets=HOOK_BUCKETS,
            registry=registry,
        )
        self.redis_up = Gauge(
            "trio_chat_redis_up",
            "1 when this instance's last heartbeat round reached Redis, 0 when it could not",
            registry=registry,
        )
        self._reconnects = _CallbackCounter(
            "trio_chat_redis_reconnects",
            "Pub/Sub reconnections since start (lost or stale connections)",
        )
        registry.register(self._reconnects)
        self._map_reads = _CallbackCounter(
            "trio_chat_redis_cluster_map_reads",
            "Redis Cluster slot maps read since start (at start, after failures and moves)",
        )
        self._redirections = _CallbackCounter(
            "trio_chat_redis_cluster_redirections",
            "Redis Cluster commands sent again to another node after MOVED or ASK",
        )
        registry.register(self._map_reads)
        registry.register(self._redirections)
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

        # Bound once: .labels() costs a lock and a dict lookup per call.
        self._handshake = {o: self.handshakes.labels(o) for o in HANDSHAKE_OUTCOMES}
        self._in = self.frames_in.values
        self._out = self.frames_out.values
        self._fanout = self.fanout_deliveries.values

    # --- wiring ------------------------------------------------------------------------------

    def bind_hub(self, hub: HubLike) -> None:
        """Read ``trio_chat_sessions``, ``trio_chat_redis_reconnects_total`` and
        ``trio_chat_redis_up`` from ``hub`` at scrape time (``len(hub.sessions)``,
        ``hub.reconnects``, ``hub.redis_up``)."""
        self.sessions.set_function(lambda: len(hub.sessions))
        self.redis_up.set_function(lambda: 1 if hub.redis_up else 0)
        self._reconnects.source = lambda: hub.reconnects

    def bind_cluster(self, backend: ClusterLike) -> None:
        """Read the ``trio_chat_redis_cluster_*`` counters from ``backend`` at scrape time
        (they stay 0 on other backends)."""
        self._map_reads.source = lambda: backend.map_reads
        self._redirections.source = lambda: backend.redirections

    # --- connections ---------------------------------------------------------------------------

    def connection(self) -> _Tracker:
        """A context manager around one socket's whole life: counts it in
        ``trio_chat_connections`` while inside."""
        return _Tracker(self.connections)

    def handshake(self, outcome: str) -> None:
        """Count one handshake: ``"accepted"``, or the refusal's ``AuthError.code``."""
        child = self._handshake.get(outcome)
        if child is None:
            if not _OUTCOME.fullmatch(outcome):
                outcome = "other"
            child = self._handshake[outcome] = self.handshakes.labels(outcome)
        child.inc()

    # --- frames ----------------------------------------------------------------------------------

    def frame_in(self, message: ClientMessage | None) -> None:
        """Count one client frame: the parsed message, or None when it did not parse."""
        self._in[_CLIENT_CLASSES.get(type(message), INVALID)] += 1

    def frame_out(self, frame: str) -> None:
        """Count one frame handed to one session's writer, by the ``type`` it was encoded with
        (:func:`~trio_chat._messages.encode` puts ``type`` first)."""
        kind = INVALID
        if frame.startswith(_FRAME_PREFIX):
            kind = frame[len(_FRAME_PREFIX) : frame.find('"', len(_FRAME_PREFIX))]
            if kind not in self._out:
                kind = INVALID
        self._out[kind] += 1

    def fanout(self, kind: str, recipients: int) -> None:
        """Count one Pub/Sub message the pump queued for ``recipients`` local sessions, as a
        ``kind`` frame (``"message"``, ``"direct"``): once per message, not per recipient."""
        self._fanout[""] += recipients
        self._out[kind if kind in self._out else INVALID] += recipients

    def signal_dropped(self, count: int = 1) -> None:
        """Count signals a congested session did not get (SPEC §15)."""
        self.signals_dropped.inc(count)

    def slow_consumer(self) -> None:
        """Count one session closed as a slow consumer."""
        self.slow_consumer_closes.inc()

    def hook(self, name: str, result: str, seconds: float) -> None:
        """Count and time one call of the application's hook ``name``."""
        self.hook_calls.labels(name, result).inc()
        self.hook_seconds.labels(name).observe(seconds)

    # --- Redis -----------------------------------------------------------------------------------

    def publishing(self) -> _Stopwatch:
        """A context manager timing one round trip of a session's PUBLISHes (its outbox batch)
        into ``trio_chat_publish_seconds``.

        Only a round trip that completes is observed: a timeout or a cancellation would
        record the timeout, not Redis's latency.
        """
        return _Stopwatch(self.publish_seconds)

    def pump_lag(self, ts_ms: object) -> None:
        """Observe ``now - ts`` for a room message arriving at the pump.

        Args:
            ts_ms: the payload's ``ts`` (unix ms). Anything but a number is ignored; a ``ts``
                in the future (clock skew between hosts) counts as no lag.
        """
        if isinstance(ts_ms, int | float) and not isinstance(ts_ms, bool):
            self.pump_lag_seconds.observe(max(0.0, time.time() - ts_ms / 1000))

    # --- exposition ------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its ``Content-Type``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Tracker:
    """Like ``Gauge.track_inprogress()``, with a precise type for callers."""

    __slots__ = ("_gauge",)

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge

    def __enter__(self) -> None:
        self._gauge.inc()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._gauge.dec()


class _Stopwatch:
    __slots__ = ("_histogram", "_start")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._histogram.observe(time.perf_counter() - self._start)


class _CounterFamily:
    """A counter family kept as plain numbers, one per label value, all known up front.

    Incremented in place through :attr:`values` (``values[label] += n``); unlabelled, the one
    value is ``values[""]``. Only trio's thread writes; a scrape from elsewhere reads a value
    at most one increment old.
    """

    def __init__(
        self, name: str, documentation: str, label: str | None = None, values: Iterable[str] = ()
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.values: dict[str, float] = dict.fromkeys(values if label else ("",), 0)

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        if self.label is None:
            family.add_metric([], self.values[""])
        else:
            for value, count in self.values.items():
                family.add_metric([value], count)
        yield family

    def _family(self) -> CounterMetricFamily:
        labels = [] if self.label is None else [self.label]
        return CounterMetricFamily(self.name, self.documentation, labels=labels)


class _CallbackCounter:
    """A counter whose value another object keeps (``hub.reconnects``), read when scraped."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.source: Callable[[], float] = lambda: 0

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.source())
