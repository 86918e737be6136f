"""The Redis Cluster backend (SPEC §12): batches routed by slot, sharded Pub/Sub, failover.

coredis 6.9's cluster client does not survive a failover: its pipelines keep the old slot map,
and its sharded Pub/Sub goes silent on every shard when one master dies (measured in
docs/cluster-notes.md). So this backend routes by itself, over single-node connections:

- **Batches.** A batch is split by the slot of each command's key (a command on several keys,
  one command per key); each master's share goes to a :class:`~trio_chat._store.redis.RedisBackend`
  of that master, which pipelines it with the other batches for that node, and the masters are
  sent their shares at once. No command spans two slots, and the history script touches one key
  and its same-named channel, so the cluster takes every one of them. The presence and
  read-marker scripts touch one key each; what they would do on other slots (the room index,
  the event) is a second round trip built from their answers (:mod:`.rooms`).
- **Redirections.** A command a node answers ``MOVED`` (its slot has another owner: a failover,
  a resharding) is sent again to the node named, and the slot map is read again; ``ASK`` (the
  slot is being migrated) to the node named, after ``ASKING``. Neither ran where it was
  refused, so sending it again is exact.
- **Failures.** A master that cannot be reached fails the batch with BackendUnavailable, as a
  single Redis does, and the slot map is read again in the background, so that once its replica
  is promoted the batches go there.
- **Pub/Sub.** A subscription holds a connection to each master owning a channel it needs: room
  and control channels are shard channels (SSUBSCRIBE on their slot's master, SPUBLISH), and
  ``auth:*`` are classic ones, subscribed on the master owning the slot of ``auth:logout`` and
  published there, so that PUBLISH's count of receivers is every instance, as on one Redis.
  A lost node, a slot moved away, or a node the slot map no longer lists as a master (read
  after a failed batch: its replica took over while it was stalled), loses the subscription;
  the hub opens a new one (which reads the slot map first) and catches up from the room
  streams.
"""

from __future__ import annotations

import bisect
import logging
import math
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import trio
from coredis.exceptions import AskError, ClusterDownError, MovedError, ResponseError, TryAgainError

from .._errors import BackendUnavailable, ConfigError, single_error
from .._messages import now_ms
from . import keys, resp
from .interface import Batch, Command, Reply
from .redis import (
    make_client,
    open_redis_backend,
    open_subscription,
    unavailable,
    without_password,
)
from .rooms import is_transition

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from .redis import RedisBackend, RedisSubscription

logger = logging.getLogger(__name__)

#: schemes of a cluster URL, and the scheme of a node's URL for each
SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
#: a command redirected more often than this fails as unavailable (the cluster is reshaping)
_MAX_REDIRECTIONS = 3
#: error replies of commands the cluster refused to run: the cluster is down for their slot
_REFUSED = (ClusterDownError, TryAgainError)
#: the slot map is read at most this often in the background after failures, in seconds
_MIN_MAP_INTERVAL = 0.1


@attrs.frozen
class SlotMap:
    """Which master owns each slot, as one node's CLUSTER SHARDS told it."""

    starts: list[int]  # first slot of each range, ascending
    ends: list[int]
    owners: list[str]  # "host:port" of each range's master
    #: every node listed, masters first: where to ask for the next map
    nodes: list[str]

    @classmethod
    def from_shards(cls, shards: Iterable[dict[str, Any]], *, tls: bool) -> SlotMap:
        ranges: list[tuple[int, int, str]] = []
        masters: list[str] = []
        replicas: list[str] = []
        for shard in shards:
            master = None
            for node in shard["nodes"]:
                port = node.get("tls-port") if tls else node.get("port")
                endpoint = node.get("endpoint")
                host = endpoint if endpoint not in (None, "", "?") else node["ip"]
                address = _address(str(host), int(port or 0))
                if node["role"] == "master":
                    master = address
                    masters.append(address)
                else:
                    replicas.append(address)
            slots = [int(slot) for slot in shard["slots"]]
            if master is not None:
                pairs = zip(slots[::2], slots[1::2], strict=True)
                ranges.extend((start, end, master) for start, end in pairs)
        ranges.sort()
        return cls(
            starts=[start for start, _, _ in ranges],
            ends=[end for _, end, _ in ranges],
            owners=[owner for _, _, owner in ranges],
            nodes=list(dict.fromkeys([*masters, *replicas])),
        )

    def owner(self, name: str) -> str:
        """The master owning the slot of key or channel ``name``.

        Raises:
            BackendUnavailable: no master owns it (the cluster is down for that slot).
        """
        slot = keys.hash_slot(name)
        i = bisect.bisect_right(self.starts, slot) - 1
        if i < 0 or slot > self.ends[i]:
            raise BackendUnavailable(f"Redis Cluster: no master serves slot {slot}")
        return self.owners[i]

    @property
    def masters(self) -> set[str]:
        return set(self.owners)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class ClusterURL:
    """A parsed ``redis+cluster://[user:password@]host:port[,host:port...][?query]``."""

    scheme: str  # of each node: redis or rediss
    userinfo: str  # "user:password@" or ""
    seeds: list[str]
    query: str

    @classmethod
    def parse(cls, url: str) -> ClusterURL:
        """Raises: ConfigError: not a cluster URL, with no seed node, or naming a database."""
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        seeds = []
        for seed in filter(None, hosts.split(",")):
            host, colon, port = seed.rpartition(":")
            if not colon or host.endswith(":") or not port.isdigit():
                raise ConfigError(f"redis.url: {seed!r} is not host:port")
            seeds.append(seed)
        if not seeds:
            raise ConfigError("redis.url: a cluster URL names at least one host:port")
        if parts.path not in ("", "/", "/0"):
            raise ConfigError("redis.url: a Redis Cluster has only database 0")
        return cls(
            scheme=SCHEMES[parts.scheme],
            userinfo=f"{userinfo}@" if userinfo else "",
            seeds=seeds,
            query=parts.query,
        )

    def node(self, address: str) -> str:
        """The URL of one node, with the credentials and options of the cluster's."""
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.userinfo}{address}{query}"


class ClusterBackend:
    """A :class:`~trio_chat._store.interface.Backend` on a Redis Cluster; open it with
    :func:`open_cluster_backend` (see the module docs for how it routes)."""

    def __init__(
        self, url: str, nursery: trio.Nursery, *, command_timeout: float, ping_interval: float
    ) -> None:
        #: the URL without its password
        self.url = without_password(url)
        self._cluster = ClusterURL.parse(url)
        self._nursery = nursery  # holds the nodes' backends open
        self._timeout = command_timeout
        self._ping_interval = ping_interval
        self._map: SlotMap | None = None
        self._reading: trio.Event | None = None  # set when the read of the map under way ends
        self._map_read_at = -math.inf
        self._silent: set[str] = set()  # nodes that did not tell the map when last asked
        self._nodes: dict[str, RedisBackend] = {}
        self._retire: dict[str, trio.Event] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._subscriptions: set[RedisSubscription] = set()  # open ones, told of a new map
        #: slot maps read since start, the first one included
        self.map_reads = 0
        #: commands sent again to another node after MOVED or ASK
        self.redirections = 0

    # --- the slot map ---------------------------------------------------------------------------

    async def read_map(self) -> SlotMap:
        """Read the slot map from the first node that answers, and close the backends of nodes
        that are no longer masters; a read already under way is waited for instead.

        Raises:
            BackendUnavailable: no node answered CLUSTER SHARDS.
        """
        if self._reading is not None:
            await self._reading.wait()
            if self._map is None:
                raise BackendUnavailable(f"Redis Cluster at {self.url}: no node answered")
            return self._map
        self._reading = done = trio.Event()
        try:
            self._map_read_at = trio.current_time()
            self._map = await self._ask_for_map()
            self.map_reads += 1
            for address in self._nodes.keys() - self._map.masters:
                del self._nodes[address]
                self._retire.pop(address).set()
            for subscription in self._subscriptions:
                subscription.keep_only(self._map.masters)
            return self._map
        finally:
            self._reading = None
            done.set()

    async def _ask_for_map(self) -> SlotMap:
        known = self._map.nodes if self._map is not None else []
        candidates = list(dict.fromkeys([*known, *self._cluster.seeds]))
        # a node that did not answer last time (stalled, say) is asked last: each such one
        # costs a whole timeout
        candidates.sort(key=self._silent.__contains__)
        errors = []
        for address in candidates:
            client = make_client(self._cluster.node(address), timeout=self._timeout)
            try:
                with unavailable(f"Redis at {address}"), trio.fail_after(self._timeout):
                    async with client:
                        shards = await client.cluster_shards()
            except (BackendUnavailable, ResponseError) as exc:  # e.g. a node still loading
                self._silent.add(address)
                errors.append(f"{address}: {exc}")
                continue
            self._silent.discard(address)
            slot_map = SlotMap.from_shards(shards, tls=self._cluster.scheme == "rediss")
            if slot_map.owners:
                return slot_map
            errors.append(f"{address}: owns no slot and knows no master")
        raise BackendUnavailable(
            f"Redis Cluster at {self.url}: no node answered CLUSTER SHARDS ({'; '.join(errors)})"
        )

    def _read_map_soon(self) -> None:
        """Read the map again in the background: a node failed, or a slot moved."""
        if self._reading is None and trio.current_time() - self._map_read_at > _MIN_MAP_INTERVAL:
            self._nursery.start_soon(self._read_map_quietly)

    async def _read_map_quietly(self) -> None:
        try:
            await self.read_map()
        except BackendUnavailable as exc:
            logger.warning("could not read the cluster's slot map: %s", exc)

    async def _current_map(self) -> SlotMap:
        return self._map if self._map is not None else await self.read_map()

    # --- the nodes ------------------------------------------------------------------------------

    async def _node(self, address: str) -> RedisBackend:
        """The backend of the master at ``address``, connected now if need be.

        Raises:
            BackendUnavailable: it cannot be reached.
        """
        if (node := self._nodes.get(address)) is not None:
            return node
        async with self._opening.setdefault(address, trio.Lock()):
            if (node := self._nodes.get(address)) is None:
                retire = trio.Event()
                node = await self._nursery.start(self._hold_node, address, retire)
                self._nodes[address] = node
                self._retire[address] = retire
            return node

    async def _hold_node(
        self, address: str, retire: trio.Event, *, task_status: trio.TaskStatus[RedisBackend]
    ) -> None:
        async with open_redis_backend(
            self._cluster.node(address),
            command_timeout=self._timeout,
            ping_interval=self._ping_interval,
            sharded=True,
        ) as node:
            task_status.started(node)
            await retire.wait()
            # batches sent to it before the map changed end within their timeout
            await trio.sleep(self._timeout)

    # --- batches --------------------------------------------------------------------------------

    async def execute(self, batch: Batch) -> None:
        """Run ``batch``: each master its share, all at once; see the module docs. Presence
        commands take their steps (:func:`_presence_steps`), the first with the rest of the
        batch, and a read marker that moved is announced in a round trip of its own.

        A command on a key of the wrong type raises coredis's ``WrongTypeError`` once every
        share has run, as on a single Redis.

        Raises:
            BackendUnavailable: a master could not be reached or did not answer in time, the
                cluster is down for a slot, or a command was redirected too often.
        """
        plain = [c for c in batch.commands if c.name not in _PRESENCE]
        if len(plain) < len(batch.commands):
            presence = [c for c in batch.commands if c.name in _PRESENCE]
            await _presence_steps(self, presence, plain)
        elif plain:
            await self._execute(plain)
        announce = Batch()
        for command in plain:
            match command.name, command.args:
                case "mark_read", (room, _, _, _, _, event) if command.reply.value and event:
                    announce.publish(keys.room_channel(room), event)
        if announce:
            await self._execute(announce.commands)

    async def run(self, commands: list[Command]) -> None:
        """Run ``commands`` as one batch (a step of :func:`_presence_steps`)."""
        await self._execute(commands)

    async def _execute(self, commands: list[Command]) -> None:
        split = [(command, _per_key(command)) for command in commands]
        sent = [part for _, parts in split for part in parts]
        slot_map = await self._current_map()
        pending: list[tuple[Command, str | None]] = [(part, None) for part in sent]
        ran = False  # some command of the batch may have run (BackendUnavailable.sent)
        for _ in range(_MAX_REDIRECTIONS + 1):
            shares: dict[str, list[Command]] = {}
            for command, target in pending:
                try:
                    address = target or slot_map.owner(_routing_name(command))
                except BackendUnavailable as exc:  # a slot no master serves (yet)
                    self._read_map_soon()
                    raise BackendUnavailable(str(exc), sent=ran) from exc
                share = shares.setdefault(address, [])
                if target is not None and not isinstance(command.reply.value, MovedError):
                    share.append(Command("asking", (), Reply()))
                share.append(command)
            await self._send(shares, ran)
            pending = []
            for command in sent:
                if isinstance(reply := command.reply.value, AskError):  # MOVED is one too
                    pending.append((command, _address(reply.host, reply.port)))
                    if isinstance(reply, MovedError):
                        self._read_map_soon()
                elif not isinstance(reply, _REFUSED):
                    ran = True
            if not pending:
                break
            self.redirections += len(pending)
            sent = [command for command, _ in pending]
        else:
            raise BackendUnavailable(f"Redis Cluster at {self.url}: slots keep moving", sent=ran)
        replies = [part.reply.value for _, parts in split for part in parts]
        if down := [r for r in replies if isinstance(r, _REFUSED)]:
            self._read_map_soon()
            raise BackendUnavailable(f"Redis Cluster at {self.url}: {down[0]}", sent=ran)
        if errors := [r for r in replies if isinstance(r, ResponseError)]:
            raise errors[0]
        for command, parts in split:
            if parts != [command]:  # one per key: the counts add up
                command.reply.set(sum(part.reply.value for part in parts))

    async def _send(self, shares: dict[str, list[Command]], ran: bool) -> None:
        """Send each master its share, all at once, and wait for every one of them.

        Raises:
            BackendUnavailable: a master could not be reached or did not answer (``sent``
                unless no share can have run, nor any command before: ``ran``); the first
                other error of a share (a bug) as itself.
        """
        failures: list[Exception] = []

        async def send(address: str, commands: list[Command]) -> None:
            share = Batch()
            share.commands = commands
            try:
                node = await self._node(address)
            except BackendUnavailable as exc:  # nothing of this share was sent
                failures.append(BackendUnavailable(str(exc), sent=False))
                return
            try:
                await node.execute(share, each=True)
            except Exception as exc:  # the other shares run on
                failures.append(exc)

        if len(shares) == 1:
            await send(*next(iter(shares.items())))
        else:
            async with trio.open_nursery() as nursery:
                for address, commands in shares.items():
                    nursery.start_soon(send, address, commands)
        if failures:
            failures.sort(key=lambda exc: isinstance(exc, BackendUnavailable))  # bugs first
            first = failures[0]
            if not isinstance(first, BackendUnavailable):
                raise first
            self._read_map_soon()
            # (bugs sort first: every failure is BackendUnavailable here)
            unreached = [f for f in failures if isinstance(f, BackendUnavailable)]
            sent = ran or len(failures) < len(shares) or any(f.sent for f in unreached)
            raise BackendUnavailable(str(first), sent=sent) from first

    # --- Pub/Sub --------------------------------------------------------------------------------

    @asynccontextmanager
    async def subscription(self) -> AsyncIterator[RedisSubscription]:
        """Open a subscription on the cluster as it is now (the slot map is read first); see
        :class:`~trio_chat._store.redis.RedisSubscription` and Backend.

        Raises:
            BackendUnavailable: on entry, when the map cannot be read, or the master of the
                classic channels cannot be reached.
        """
        slot_map = await self.read_map()
        home = slot_map.owner(keys.LOGOUT_CHANNEL)  # where classic channels are published

        def route(channel: str) -> str:
            current = self._map or slot_map
            return current.owner(channel) if keys.is_shard_channel(channel) else home

        def connect(address: str) -> resp.Target:
            return resp.target(make_client(self._cluster.node(address), timeout=self._timeout))

        async with open_subscription(
            connect,
            route,
            home,
            command_timeout=self._timeout,
            ping_interval=self._ping_interval,
            sharded=True,
        ) as subscription:
            self._subscriptions.add(subscription)
            try:
                yield subscription
            finally:
                self._subscriptions.discard(subscription)

    # --- state ----------------------------------------------------------------------------------

    async def state(self) -> dict[str, object]:
        """The cluster as a master sees it (CLUSTER INFO), for ``/readyz``: ``state`` (``ok``,
        ``fail``, or ``unreachable`` when no master answered), and counts of masters, nodes and
        slots served."""
        slot_map = self._map
        with trio.move_on_after(self._timeout):  # in all: a probe must not hang
            for address in slot_map.nodes if slot_map is not None else self._cluster.seeds:
                client = make_client(self._cluster.node(address), timeout=self._timeout)
                try:
                    with unavailable(f"Redis at {address}"):
                        async with client:
                            info = await client.cluster_info()
                except (BackendUnavailable, ResponseError):
                    continue
                return {
                    "state": info.get("cluster_state", "unknown"),
                    "masters": int(info.get("cluster_size", 0)),
                    "known_nodes": int(info.get("cluster_known_nodes", 0)),
                    "slots_ok": int(info.get("cluster_slots_ok", 0)),
                }
        return {"state": "unreachable"}


#: the commands a cluster runs in steps
_PRESENCE = frozenset({"occupy", "renew_room"})


async def _presence_steps(
    cluster: ClusterBackend, commands: list[Command], first: list[Command]
) -> None:
    """``occupy`` and ``renew_room`` on a cluster, whose keys sit on different slots: the same
    steps as the scripts of :mod:`.rooms`, one round trip each (a failure between two loses
    that change of a count): the sessions' memberships (with the batch's other commands,
    ``first``, so that they keep the batch's place among the others sent to each master),
    then the users' counts of each room, then ``ws:rooms`` (by increments at each arrival and
    departure, which commute where two instances' absolute writes could cross) and the
    announcements."""
    now = now_ms()
    members = Batch()
    # (command, room, TTL, +1 or -1, each user's membership changes)
    changes: list[tuple[Command, str, float, int, list[tuple[str, Reply[int]]]]] = []
    for command in commands:
        match command.name, command.args:
            case "occupy", (room, session, user, delta, ttl, _):
                presence = keys.room_presence(room)
                if delta > 0:
                    changed = members.zadd(presence, {session: now})
                else:
                    changed = members.zrem(presence, session)
                members.expire(presence, ttl)
                changes.append((command, room, ttl, delta, [(user, changed)]))
            case "renew_room", (room, local, ttl):
                presence = keys.room_presence(room)
                added = [(user, members.zadd(presence, {s: now})) for s, user in local.items()]
                members.expire(presence, ttl)
                changes.append((command, room, ttl, 1, added))
    await cluster.run([*first, *members.commands])

    counting = Batch()
    counts = []
    for command, room, ttl, sign, memberships in changes:
        deltas: dict[str, int] = {}
        for user, changed in memberships:
            deltas[user] = deltas.get(user, 0) + sign * changed.value
        reply: Reply[list[int]] = Reply()
        counting.commands.append(
            Command("count", (keys.room_users(room), ttl, list(deltas.items())), reply)
        )
        counts.append((command, deltas, reply))
    await cluster.run(counting.commands)

    after = Batch()
    for command, deltas, reply in counts:
        *sessions, users = reply.value
        room = command.args[0]
        arrived = departed = 0
        for delta, n in zip(deltas.values(), sessions, strict=True):
            if delta and is_transition(delta, n):
                arrived, departed = arrived + (delta > 0), departed + (delta < 0)
                if command.name == "occupy" and (event := command.args[5]) is not None:
                    after.publish(keys.room_channel(room), event)
        if not users:  # (also where the counts expired, or a reaper came late)
            after.zrem(keys.ROOMS, room)
        elif command.name == "renew_room":  # the heartbeat's: repairs a lost index
            after.zadd(keys.ROOMS, {room: users})
        elif arrived - departed:
            after.zincrby(keys.ROOMS, room, arrived - departed)
            if departed:
                after.zremrangebyscore(keys.ROOMS, -math.inf, 0)
        if command.name == "occupy":
            [delta] = deltas.values()
            command.reply.set((bool(delta), sessions[0], users))
        else:
            command.reply.set(users)
    if after:
        await cluster.run(after.commands)


def _routing_name(command: Command) -> str:
    """The key (or channel) whose slot's master runs ``command``: classic channels are all
    published where they are subscribed, on the master of ``auth:logout``'s slot."""
    name: str = command.args[0]
    if command.name == "publish" and not keys.is_shard_channel(name):
        return keys.LOGOUT_CHANNEL
    return name


def _per_key(command: Command) -> list[Command]:
    """``command`` itself, or for DEL and EXISTS of several keys (perhaps of several slots), or
    of none, one command per key, whose replies add up to its reply."""
    if command.name in ("delete", "exists") and len(command.args) != 1:
        return [Command(command.name, (key,), Reply()) for key in command.args]
    return [command]


@asynccontextmanager
async def open_cluster_backend(
    url: str, *, command_timeout: float, ping_interval: float = 5.0
) -> AsyncIterator[ClusterBackend]:
    """Connect to the Redis Cluster whose seed nodes ``url`` names, and read its slot map.

    Args:
        url: ``redis+cluster://`` or ``rediss+cluster://``, any number of ``host:port``.
        command_timeout: the longest any round trip to one node may take, connecting included.
        ping_interval: how long a subscription may stay silent before it checks its nodes.

    The backend, its connections and their tasks live in this context and close on exit.

    Raises:
        ConfigError: ``url`` cannot be parsed.
        BackendUnavailable: no seed node answered within ``command_timeout``.
    """
    with single_error():
        async with trio.open_nursery() as nursery:
            backend = ClusterBackend(
                url, nursery, command_timeout=command_timeout, ping_interval=ping_interval
            )
            await backend.read_map()
            yield backend
            nursery.cancel_scope.cancel()
