"""The Soak: its population of users and clients, the instances and Redis (or the cluster)
it starts and watches, the traffic (sends, room visits, read markers) and progress lines, and
the run from set-up to the leak check. Its faults are in _soak.faults; the checks of the
rooms' keys (SPEC §15) in _soak.rooms."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import trio

from .children import CLUSTERS, Child, redis_cluster_class
from .clients import Client, User
from .common import (
    ADMIN_KEY,
    HOOKS_SECRET,
    INSTANCE_TTL,
    PROGRESS_EVERY,
    REFRESH_WINDOW,
    ROOT,
    SECRET,
    SESSION_TTL,
    SHUTDOWN_TIMEOUT,
    START_TIMEOUT,
    SoakError,
    free_port,
)
from .faults import Faults
from .ledger import Ledger
from .netem import Net
from .rooms import ReplyError, bad_read_markers, presence_mismatches, room_keys_left, snapshot

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

#: the instances' configuration file: presence events in every room (``[[rooms]]`` is TOML only)
ROOMS_CONFIG = """\
[[rooms]]
match = "*"
presence_events = true
"""
#: at the end, how long the presence keys may take to agree with the clients (a dead instance
#: is reaped within about 3 x session.instance_ttl)
PRESENCE_SETTLE = 20.0


class Slot:
    """One instance position: a fixed port, successive processes (incarnations)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.port = free_port()
        self.admin_port = free_port()
        self.incarnation = 0
        self.child: Child | None = None
        self.state = "down"  # down, starting, up
        self.lock = trio.Lock()  # one fault at a time on one instance

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def instance_id(self) -> str:
        return f"soak-{self.index + 1}-{self.incarnation}"


class Soak(Faults):
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rate = args.rate if args.rate is not None else max(1.0, args.clients / 10)
        self.duration = args.minutes * 60
        self.structure_rng = random.Random(args.seed)
        self.traffic_rng = random.Random(args.seed + 1)
        self.fault_rng = random.Random(args.seed + 2)
        self.ledger = Ledger()
        self.counts: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.faults: list[dict[str, Any]] = []
        self.unexpected: list[dict[str, Any]] = []
        self.net = Net(args.netem_impl, workdir) if args.netem else None
        self.redis_host = "127.0.0.1"
        self.redis_port = free_port()
        self.redis: Child | None = None
        #: --hooks: the hooks application the instances ask (peers/hooks_allow.py)
        self.hooks_port = free_port()
        self.hooks_app: Child | None = None
        self.redis_lock = trio.Lock()  # one Redis (or cluster) fault at a time
        self.net_lock = trio.Lock()
        #: --cluster: the RedisCluster (set up in run), and the ports of the nodes whose process
        #: a fault is replacing right now (the monitor leaves those alone)
        self.cluster: Any = None
        self.node_busy: set[int] = set()
        self.slots = [Slot(i) for i in range(args.instances)]
        self.started = time.monotonic()
        self.traffic_started: float | None = None
        self.traffic_t0 = 0.0  # trio clock
        self.ending = trio.Event()
        self.http: httpx.AsyncClient | None = None
        self.rss_start: list[int | None] = []
        self.rss_end: list[int | None] = []
        self.users: dict[str, User] = {}
        self.clients: list[Client] = []
        self.config_file = workdir / "trio-chat.toml"
        self.config_file.write_text(ROOMS_CONFIG)
        self._build_population()

    # --- set-up ----------------------------------------------------------------------------

    def _build_population(self) -> None:
        rng, args = self.structure_rng, self.args
        rooms = self.room_names = [f"room-{r:03d}" for r in range(args.rooms)]
        user: User | None = None
        for index in range(args.clients):
            if user is None or index % 5 != 1:  # every fifth user has a second device
                user = User(f"user-{index:04d}")
                self.users[user.name] = user
            count = rng.choices([1, 2, 3], weights=[5, 3, 2])[0]
            mine = [rooms[index % len(rooms)]]  # every room has members
            mine += rng.sample([r for r in rooms if r != mine[0]], min(count - 1, len(rooms) - 1))
            client = Client(self, index, user, mine)
            user.clients.append(client)
            self.clients.append(client)

    @property
    def redis_url(self) -> str:
        if self.cluster is not None:
            return str(self.cluster.url)  # redis+cluster:// and the three first masters
        return f"redis://{self.redis_host}:{self.redis_port}/0"

    def clock(self) -> float:
        base = self.traffic_started if self.traffic_started is not None else self.started
        return time.monotonic() - base

    def instance_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_CHAT_")}
        env.update(
            TRIO_CHAT_AUTH_JWT_SECRET=SECRET,
            TRIO_CHAT_ADMIN_API_KEY=ADMIN_KEY,
            TRIO_CHAT_AUTH_REFRESH_WINDOW=str(REFRESH_WINDOW),
            TRIO_CHAT_SESSION_TTL=str(SESSION_TTL),
            TRIO_CHAT_SESSION_INSTANCE_TTL=str(INSTANCE_TTL),
            TRIO_CHAT_SERVER_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
            TRIO_CHAT_LIMITS_MAX_SESSIONS_PER_USER="1000",
            TRIO_CHAT_LIMITS_OUTBOUND_QUEUE="4096",
            TRIO_CHAT_LIMITS_FRAME_RATE="1000",
            TRIO_CHAT_LIMITS_FRAME_BURST="2000",
        )
        if self.args.hooks:
            env.update(
                TRIO_CHAT_HOOKS_URL=f"http://127.0.0.1:{self.hooks_port}/hooks",
                TRIO_CHAT_HOOKS_SECRET=HOOKS_SECRET,
            )
        return env

    async def start_hooks_app(self) -> None:
        """Start peers/hooks_allow.py (every hook allowed) and wait until it accepts."""
        argv = [sys.executable, str(ROOT / "bench" / "peers" / "hooks_allow.py")]
        argv += ["--port", str(self.hooks_port), "--secret", HOOKS_SECRET]
        self.hooks_app = Child("hooks", argv, self.workdir / "hooks.log")
        with trio.move_on_after(10):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", self.hooks_port)).aclose()
                    return
                except OSError:
                    await trio.sleep(0.05)
        raise SoakError(f"the hooks application did not start: see {self.hooks_app.log}")

    def mint(self, user: str) -> str:
        now = int(time.time())
        claims = {"sub": user, "iat": now, "exp": now + self.args.token_ttl}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SoakError("redis-server is not on PATH (`make redis-server` installs it)")
        argv = [binary, "--port", str(self.redis_port), "--bind", self.redis_host]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        argv += ["--dir", str(self.workdir), "--hz", "100", "--daemonize", "no"]
        if self.net is not None:
            argv = [*self.net.exec_prefix, *argv]
        self.redis = Child("redis", argv, self.workdir / "redis.log")

    async def redis_up(self, timeout: float = 10.0) -> bool:
        with trio.move_on_after(timeout):
            while True:
                try:
                    with trio.fail_after(1):
                        stream = await trio.open_tcp_stream(self.redis_host, self.redis_port)
                        async with stream:
                            await stream.send_all(b"PING\r\n")
                            if (await stream.receive_some(16)).startswith(b"+PONG"):
                                return True
                except (OSError, trio.TooSlowError):
                    pass
                await trio.sleep(0.05)
        return False

    async def start_instance(self, slot: Slot) -> bool:
        """Start the slot's next incarnation and wait until it is ready; retried while it
        exits 1 (Redis unreachable at start, as documented)."""
        deadline = trio.current_time() + START_TIMEOUT * 2
        while trio.current_time() < deadline:
            slot.incarnation += 1
            slot.state = "starting"
            argv = [sys.executable, "-m", "trio_chat", "serve", "--port", str(slot.port)]
            argv += ["--admin-port", str(slot.admin_port), "--redis-url", self.redis_url]
            argv += ["--instance-id", slot.instance_id, "--log-format", "json"]
            argv += ["--config", str(self.config_file)]
            child = slot.child = Child(
                slot.instance_id,
                argv,
                self.workdir / f"{slot.instance_id}.log",
                env=self.instance_env(),
            )
            ready_by = trio.current_time() + START_TIMEOUT
            healthy = False
            while trio.current_time() < ready_by:
                if (code := child.exited()) is not None:
                    if code == 1:
                        self.counts["start_failures"] += 1
                    else:
                        self._unexpected(child, code, "exited while starting")
                    child.expected = True
                    break
                status = await self._get(slot, "/readyz")
                if status == 200:
                    slot.state = "up"
                    return True
                healthy = healthy or status == 503
                await trio.sleep(0.1)
            else:
                if healthy:  # running, only not ready (Redis is still faulty): serve anyway
                    slot.state = "up"
                    return True
                child.signal(signal.SIGKILL)
                self._unexpected(child, None, "never became healthy")
            await trio.sleep(1.0)
        slot.state = "down"
        return False

    async def _get(self, slot: Slot, path: str) -> int | None:
        assert self.http is not None
        try:
            return (await self.http.get(slot.admin + path, timeout=2)).status_code
        except httpx.HTTPError:
            return None

    async def admin_post(self, path: str) -> dict[str, Any] | None:
        """POST to the admin API of some live instance; None if none could do it in 15 s."""
        assert self.http is not None
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with trio.move_on_after(15):
            while True:
                up = [s for s in self.slots if s.state == "up"]
                self.fault_rng.shuffle(up)
                for slot in up:
                    try:
                        response = await self.http.post(
                            slot.admin + path, headers=headers, timeout=5
                        )
                    except httpx.HTTPError:
                        continue
                    if response.status_code == 200:
                        body: dict[str, Any] = response.json()
                        return body
                await trio.sleep(0.5)
        return None

    def pick_slot(self) -> Slot:
        """The less loaded of two live instances picked at random (a load balancer's "power
        of two choices"): a restarted instance fills up again."""
        up = [s for s in self.slots if s.state == "up"] or self.slots
        first, second = self.traffic_rng.choice(up), self.traffic_rng.choice(up)
        return first if self.load(first) <= self.load(second) else second

    def load(self, slot: Slot) -> int:
        return sum(1 for c in self.clients if c.conn is not None and c.conn.slot is slot)

    async def gate(self, user: User) -> None:
        """Wait while the user is banned or a logout of it is under way."""
        while True:
            if user.banned:
                await user.unbanned.wait()
                continue
            wait = user.barrier - time.time()
            if wait <= 0:
                return
            await trio.sleep(min(wait, 1.0))

    # --- watching the processes ------------------------------------------------------------

    def _unexpected(self, child: Child, code: int | None, why: str) -> None:
        self._unexpected_process(child.name, child.pid, code, why)

    def _unexpected_process(self, name: str, pid: int, code: int | None, why: str) -> None:
        self.unexpected.append(
            {"process": name, "pid": pid, "code": code, "why": why, "t": round(self.clock(), 1)}
        )
        print(f"[soak] UNEXPECTED: {name} (pid {pid}) {why}, code {code}", file=sys.stderr)

    async def monitor(self, nursery: trio.Nursery) -> None:
        """Notice processes that die by themselves; restart them, as a supervisor would."""
        while True:
            await trio.sleep(0.2)
            for slot in self.slots:
                child = slot.child
                if slot.state == "up" and child is not None and not child.expected:
                    if (code := child.exited()) is not None:
                        child.expected = True
                        slot.state = "down"
                        self._unexpected(child, code, "exited by itself")
                        nursery.start_soon(self._restart_unexpected, slot)
            redis = self.redis
            if redis is not None and not redis.expected and (code := redis.exited()) is not None:
                redis.expected = True
                self._unexpected(redis, code, "exited by itself")
                async with self.redis_lock:
                    self.start_redis()
                    await self.redis_up()
            cluster = self.cluster
            for port in cluster.ports if cluster is not None else ():
                # the fixture's Popen of the node (None while it is killed on purpose)
                process = cluster._processes.get(port)
                if port in self.node_busy or process is None:
                    continue
                if (code := process.poll()) is not None:
                    self.node_busy.add(port)
                    self._unexpected_process(f"redis-{port}", process.pid, code, "exited by itself")
                    nursery.start_soon(self._restart_node_unexpected, port)

    async def _restart_node_unexpected(self, port: int) -> None:
        async with self.redis_lock:
            try:
                await trio.to_thread.run_sync(self.cluster.restart, port)
            finally:
                self.node_busy.discard(port)
            await self.settled()

    async def _restart_unexpected(self, slot: Slot) -> None:
        async with slot.lock:
            await self.start_instance(slot)

    # --- traffic and progress ----------------------------------------------------------------

    async def sender(self) -> None:
        rng = self.traffic_rng
        due = trio.current_time()
        while not self.ending.is_set():
            due += rng.expovariate(self.rate)
            await trio.sleep_until(due)
            for _ in range(10):
                if rng.choice(self.clients).try_send(rng):
                    break
            else:
                self.counts["send_skipped"] += 1

    async def churn(self) -> None:
        """Ordinary closes (1000) all along, as phones change networks: each client about once
        every ``--churn`` seconds; it comes back at once and rejoins with ``since``."""
        if self.args.churn <= 0:
            return
        rng = random.Random(self.args.seed + 3)
        async with trio.open_nursery() as nursery:
            while not self.ending.is_set():
                await self.pause(rng.expovariate(len(self.clients) / self.args.churn))
                client = rng.choice(self.clients)
                if client.conn is not None and not self.ending.is_set():
                    self.counts["churn_closes"] += 1
                    nursery.start_soon(client.reconnect)

    async def visits(self) -> None:
        """Presence churn: a client joins a room not its own, stays 1-10 s and leaves; each
        client about once every ``--visit-every`` seconds (one visit at a time)."""
        if self.args.visit_every <= 0:
            return
        rng = random.Random(self.args.seed + 4)
        while not self.ending.is_set():
            await self.pause(rng.expovariate(len(self.clients) / self.args.visit_every))
            if not self.ending.is_set():
                rng.choice(self.clients).try_visit(rng, rng.uniform(1.0, 10.0))

    async def reads(self) -> None:
        """Read markers: each client about once every ``--read-every`` seconds marks a message
        it received read (SPEC §15)."""
        if self.args.read_every <= 0:
            return
        rng = random.Random(self.args.seed + 5)
        while not self.ending.is_set():
            await self.pause(rng.expovariate(len(self.clients) / self.args.read_every))
            if not self.ending.is_set():
                rng.choice(self.clients).try_read(rng)

    def progress(self, phase: str) -> None:
        counts, ledger = self.counts, self.ledger
        connected = sum(c.conn is not None for c in self.clients)
        up = sum(s.state == "up" for s in self.slots)
        last = self.faults[-1] if self.faults else None
        deliveries = ledger.counts["delivered_live"] + ledger.counts["delivered_replay"]
        line = (
            f"[soak {self.clock():6.0f}s {phase}] sent={counts['sent']} "
            f"acked={ledger.counts['acked']} "
            f"send_errors={sum(ledger.send_errors.values())} unknown={counts['send_unknown']} "
            f"deliveries={deliveries} dup={ledger.counts['duplicates']} "
            f"connected={connected}/{len(self.clients)} instances_up={up}/{len(self.slots)} "
            f"connects={counts['connects']} visits={counts['visits']} "
            f"reads={ledger.counts['reads']} faults={len(self.faults)}"
        )
        if last is not None:
            line += f" last={last['kind']}@{last['t']}s"
        print(line, flush=True)

    async def progress_loop(self, phase: list[str]) -> None:
        while True:
            await trio.sleep(PROGRESS_EVERY)
            self.progress(phase[0])

    # --- the run -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        phase = ["setup"]
        async with httpx.AsyncClient() as self.http, trio.open_nursery() as root:
            if self.net is not None:
                # on this thread: PR_SET_PDEATHSIG fires when the thread that forked exits
                self.net.setup()
                self.redis_host = self.net.remote
            if self.args.cluster:
                await self.start_cluster()
            else:
                self.start_redis()
                if not await self.redis_up():
                    raise SoakError(f"redis-server did not start: see {self.workdir / 'redis.log'}")
            if self.args.hooks:
                await self.start_hooks_app()
            async with trio.open_nursery() as starting:
                for slot in self.slots:
                    starting.start_soon(self.start_instance, slot)
            if any(s.state != "up" for s in self.slots):
                raise SoakError(f"an instance did not start: see the logs in {self.workdir}")
            root.start_soon(self.monitor, root)
            root.start_soon(self.progress_loop, phase)
            async with trio.open_nursery() as clients:
                for client in self.clients:
                    clients.start_soon(client.run)
                    await trio.sleep(0.01)
                with trio.move_on_after(60):
                    while not all(len(c.member_since) == len(c.rooms) for c in self.clients):
                        await trio.sleep(0.1)
                self.rss_start = [s.child.rss_kib() if s.child else None for s in self.slots]
                phase[0] = "traffic"
                self.traffic_started = time.monotonic()
                self.traffic_t0 = trio.current_time()
                self.progress("start")
                async with trio.open_nursery() as faults:
                    faults.start_soon(self.sender)
                    faults.start_soon(self.churn)
                    faults.start_soon(self.visits)
                    faults.start_soon(self.reads)
                    faults.start_soon(self.fault_schedule, faults)
                    await trio.sleep(self.duration)
                    self.ending.set()  # the sender stops; running faults heal and return
                phase[0] = "drain"
                await self.heal()
                result["drain_s"] = await self.drain()
                result["clients_ready_at_end"] = sum(c.ready for c in self.clients)
                result["presence"] = await self.presence_check()
                self.rss_end = [s.child.rss_kib() if s.child else None for s in self.slots]
                phase[0] = "stop"
                async with trio.open_nursery() as closing:
                    for client in self.clients:
                        closing.start_soon(client.close)
                clients.cancel_scope.cancel()
            await self.stop_instances()
            phase[0] = "leak check"
            result["clean_at_stop"] = await self.clean()
            result["rooms_end"] = await self.rooms_end()
            await trio.sleep(SESSION_TTL + 0.5)
            result["clean"] = await self.clean()
            result["leaks"] = await self.leaks()
            root.cancel_scope.cancel()
        return result

    async def start_cluster(self) -> None:
        """3 masters and 3 replicas (tests/_redis_cluster.py), in ``<workdir>/cluster``."""
        try:
            cluster = redis_cluster_class()(self.workdir / "cluster")
        except FileNotFoundError as exc:
            raise SoakError(f"{exc} (`make redis-server` installs them)") from exc
        CLUSTERS.append(cluster)
        try:
            await trio.to_thread.run_sync(cluster.start)
        except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
            raise SoakError(f"the Redis Cluster did not start: {exc}") from exc
        self.cluster = cluster

    async def heal(self) -> None:
        """After the traffic: Redis running and answering, the network clean, every instance
        up, nobody banned."""
        if self.redis is not None:
            self.redis.signal(signal.SIGCONT, ends_it=False)
        if self.net is not None:
            await trio.to_thread.run_sync(self.net.apply)
        if self.cluster is not None:
            async with self.redis_lock:
                for port in self.cluster.ports:
                    if not self.cluster.running(port):
                        await self._node("restart", port)
                    elif port not in self.cluster.live_ports():
                        self.cluster.resume(port)
                await self.settled()
        elif not await self.redis_up(20):
            async with self.redis_lock:
                self.start_redis()
                await self.redis_up(20)
        if self.hooks_app is not None and self.hooks_app.exited() is not None:
            await self.start_hooks_app()
        for slot in self.slots:
            if slot.state != "up":
                async with slot.lock:
                    if slot.state != "up":
                        await self.start_instance(slot)
        for user in self.users.values():
            if user.banned:
                await self._unban(user)

    async def drain(self) -> float:
        """Wait until every client is connected, joined everywhere, has its answers, and every
        acknowledged message has arrived (or is a gap); at most ``--drain-timeout``."""
        began = trio.current_time()
        with trio.move_on_after(self.args.drain_timeout):
            while True:
                await trio.sleep(0.5)
                if all(c.ready for c in self.clients):
                    audit = self.ledger.audit()
                    if audit["lost"] == 0:
                        await trio.sleep(1.0)  # and a last second for stragglers (duplicates)
                        break
        return round(trio.current_time() - began, 1)

    async def stop_instances(self) -> None:
        async def stop(slot: Slot) -> None:
            child = slot.child
            if child is None or child.exited() is not None:
                return
            slot.state = "down"
            child.signal(signal.SIGTERM)
            code = await child.wait(SHUTDOWN_TIMEOUT + 7)
            if code is None:
                child.signal(signal.SIGKILL)
                await child.wait(5)
                self._unexpected(child, None, "did not stop within the drain deadline (SIGKILLed)")
            elif code != 0:
                self._unexpected(child, code, "did not exit 0 on SIGTERM")

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(stop, slot)

    async def redis_nodes(self) -> list[tuple[str, int]]:
        """The one Redis, or every master of the cluster."""
        if self.cluster is not None:
            masters = await trio.to_thread.run_sync(self.cluster.masters)
            return [("127.0.0.1", port) for port in masters]
        return [(self.redis_host, self.redis_port)]

    async def presence_check(self) -> dict[str, Any]:
        """With every client connected and idle: the presence keys agree with the clients'
        rooms (_soak.rooms.presence_mismatches); given up to ``PRESENCE_SETTLE`` seconds (a
        session of a dead instance counts until it is reaped)."""
        began = trio.current_time()
        mismatches: list[dict[str, Any]] = []
        first: int | None = None
        with trio.move_on_after(PRESENCE_SETTLE):
            while True:
                try:
                    found = await trio.to_thread.run_sync(snapshot, await self.redis_nodes())
                    mismatches = presence_mismatches(found, self.clients)
                except (OSError, ReplyError, ValueError) as exc:
                    mismatches = [{"error": f"{type(exc).__name__}: {exc}"}]
                if first is None:
                    first = len(mismatches)
                if not mismatches:
                    break
                await trio.sleep(0.5)
        # counts above the clients' first (a count that outlives its session leaks), then below
        mismatches.sort(key=lambda m: (m.get("redis") or 0) <= (m.get("clients") or 0))
        for sample in mismatches[:5]:  # what the user's clients did lately (its trail)
            if "user" in sample and sample["user"] in self.users:
                sample["trails"] = {
                    c.index: list(c.trail)[-15:] for c in self.users[sample["user"]].clients
                }
        return {
            "mismatches": len(mismatches),
            "mismatches_first": first,
            "settle_s": round(trio.current_time() - began, 1),
            "samples": mismatches[:10],
        }

    async def rooms_end(self) -> dict[str, Any]:
        """Every client gone, every instance stopped (and dead ones reaped): no users hash, no
        member of ``ws:rooms``, no instance's room list; and every read marker left names a
        message of its room that its user read."""
        with trio.fail_after(30):
            found = await trio.to_thread.run_sync(snapshot, await self.redis_nodes())
        left = room_keys_left(found)
        checked, bad = bad_read_markers(found, self.ledger)
        return {
            "left": len(left),
            "left_sample": left[:20],
            "read_markers": checked,
            "bad_read_markers": len(bad),
            "bad_read_marker_samples": bad[:10],
        }

    async def clean(self) -> str:
        argv = [sys.executable, "-m", "trio_chat", "clean", "--redis-url", self.redis_url]
        argv += ["--config", str(self.config_file)]
        with trio.fail_after(30):
            done = await trio.run_process(
                argv, env=self.instance_env(), capture_stdout=True, capture_stderr=True, check=False
            )
        return (done.stdout + done.stderr).decode().strip()

    async def leaks(self) -> dict[str, Any]:
        """The ``ws:*`` keys left: on the one Redis, or on every master of the cluster. The
        read markers (``ws:read:<room>``) stay until their TTL (``history.ttl``): one with a TTL
        is not a leak (_soak.rooms checks what it holds)."""
        nodes = await self.redis_nodes()
        locks: list[str] = []
        leaked: list[str] = []
        read_markers = 0
        details: list[str] = []
        with trio.fail_after(30):
            for host, port in nodes:
                cli = ["redis-cli", "-h", host, "-p", str(port)]
                keys = await trio.run_process(
                    [*cli, "--scan", "--pattern", "ws:*"], capture_stdout=True
                )
                mine: list[str] = []
                for name in sorted(keys.stdout.decode().split()):
                    if name.startswith("ws:read:"):
                        ttl = await trio.run_process([*cli, "ttl", name], capture_stdout=True)
                        if int(ttl.stdout.decode().strip() or -1) > 0:
                            read_markers += 1
                            continue
                    (locks if name.startswith("ws:reap:") else mine).append(name)
                leaked += mine
                for name in mine[: max(0, 20 - len(details))]:
                    kind = await trio.run_process([*cli, "type", name], capture_stdout=True)
                    ttl = await trio.run_process([*cli, "ttl", name], capture_stdout=True)
                    where = f"{port}: " if self.cluster is not None else ""
                    details.append(
                        f"{where}{name} ({kind.stdout.decode().strip()}, "
                        f"ttl {ttl.stdout.decode().strip()})"
                    )
        return {
            "leaked": len(leaked),
            "leaked_keys_sample": details,
            "reap_locks": len(locks),
            "read_marker_keys": read_markers,
            "masters_checked": [port for _, port in nodes] if self.cluster is not None else None,
        }
