"""Chaos soak: chat for minutes or hours under crashes, drains, Redis faults and a bad network,
then prove that nothing acknowledged was lost, nothing came twice and no record leaked.

    python bench/soak.py --minutes N [--instances 3] [--clients 300] [--rooms 30] [--rate R]
                         [--cluster | --netem] [--hooks] [--seed S] [--fault-interval SECONDS]
                         [--visit-every SECONDS] [--read-every SECONDS] [--keep]
    make soak ARGS="--minutes 30"
    python bench/soak.py --cluster --minutes 5     # on a Redis Cluster, 3 masters + 3 replicas

It starts everything it uses and stops it again, by pid: a redis-server of its own on a free
port (``--save "" --appendonly no``; with ``--netem`` inside a network namespace it creates),
``--instances`` ``trio-chat serve`` processes on it (JSON logs in a work directory), and
``--clients`` WebSocket clients in this process, each a member of one to three of ``--rooms``
rooms (a fifth of the users have two devices). With ``--cluster`` the instances run on a Redis
Cluster instead (``redis+cluster://``): three masters with a replica each, the test fixture's
``RedisCluster`` (tests/_redis_cluster.py, node timeout 1 s), its nodes' files and logs in
``<workdir>/cluster/<port>/``; ``--netem`` is for one Redis only. The clients send ``--rate``
messages per second in all; whenever their socket closes they reconnect, to the less loaded of
two live instances picked at random, and rejoin every room with ``since`` = the last message id
they received there (before any, the ``last`` their first ``joined`` named); they refresh their
short-lived tokens (``--token-ttl``) on ``token_expiring``, and each closes normally and comes
back about once every ``--churn`` seconds, as phones change networks.

The rooms of SPEC §15 too: the instances run with ``[[rooms]] match = "*" presence_events =
true`` (``<workdir>/trio-chat.toml``), so every member gets ``presence_join`` and
``presence_leave``. Besides its own rooms, each client visits another room about once every
``--visit-every`` seconds (join without ``since``, stay 1-10 s, leave; one visit at a time, not
resumed after a reconnect): presence churn, a two-device user's second device included. Its
sends may go there too; a visitor is never owed a message, so its deliveries there count only
for ``duplicates``. And about once every ``--read-every`` seconds a client marks a message read:
``read {room, id}`` with the newest id it received in a joined room, or, a quarter of the time,
one of the last eight (which must not move the marker back).

Faults, on a schedule drawn from ``--seed`` (one every ``--fault-interval`` seconds, about: 15
by default, less in runs under 3 minutes; the kinds dealt from a shuffled deck, so every kind
comes once before any comes twice):

- ``kill_instance``: SIGKILL an instance, start it again 1-3 s later (a new instance id, as a
  restarted process gets; live instances reap the dead one's sessions);
- ``drain_instance``: SIGTERM (the drain: 1001 to every client), which must exit 0 in time;
  then start it again;
- ``redis_pause``: SIGSTOP redis-server for 2-5 s, then SIGCONT;
- ``redis_restart``: SIGKILL redis-server and start an empty one on the same port;
- ``socket_resets``: reset (TCP RST, no close handshake) the sockets of 5% of the clients;
- ``logout``: ``POST /v1/users/<uid>/logout`` for one user; its clients come back with a new
  token once ``not_before`` has passed;
- ``ban``: ``POST /v1/users/<uid>/ban``, ``unban`` 3-6 s later; its clients come back then;
- with ``--cluster``, instead of the two Redis faults (one at a time, each ending once the
  cluster is ok again on every node):

  - ``master_kill``: SIGKILL a master; its replica is promoted (``failover_s``); 1-3 s later
    the old one restarts (empty) and rejoins as a replica of its replacement;
  - ``master_pause``: SIGSTOP a master for 0.3-0.7 s, under the node timeout: no failover;
  - ``master_stall``: SIGSTOP a master until its replica is promoted, and 0.5-2 s more; on
    SIGCONT it finds itself replaced and becomes a replica;
  - ``shard_loss``: SIGKILL a master and its replica, restart both empty: that shard's keys
    and room streams are gone, as all of them are after ``redis_restart`` on one Redis;

- with ``--netem``, on the link to Redis only: ``net_delay`` (20-80 ms each way, jitter, 8-15 s),
  ``net_loss`` (2-8% of packets each way, 8-15 s) and ``net_partition`` (every packet dropped,
  5 s). ``tc qdisc netem`` on a veth pair when the kernel has it; otherwise (no
  CONFIG_NET_SCH_NETEM) the same faults in a forwarder process between two TUN devices.
- with ``--hooks``, the instances ask an HTTP application on every hook (SPEC §14:
  ``bench/peers/hooks_allow.py``, which checks the signature and allows), and one more fault:
  ``hooks_restart``, SIGKILL that application and start it again 1-3 s later. Meanwhile
  handshakes are refused 503 ``hooks_unavailable`` (the clients retry) and joins and sends
  are answered ``unavailable``: a refused send is not lost, a refused join is tried again.

The invariant, checked at the end. A client is a member of a room from the moment its first
``joined`` arrived; it stays one through every drop, logout and ban, because it always comes
back and rejoins with ``since``. An acknowledged message (room, id) must reach every member
whose membership began before the sender wrote the ``send`` frame, but the sending client itself
(the server does not echo a message to its own session), exactly once, live or replayed:

- ``lost``: such a delivery that never came and no gap explains;
- ``gaps``: one that never came but lies in a gap the server owned up to: a rejoin that answered
  ``recovered: false`` excuses, for that client and room, the ids after its ``since`` and before
  the first message that followed the ``joined`` (at most the ``joined``'s own time); each is
  charged to the last fault that began before that ``joined`` (``gaps_by_fault``);
- ``lost_unreplicated`` (``--cluster``): Redis replicates asynchronously, so a message the old
  master acknowledged may never reach the replica promoted in its place (or a stalled master
  may run, on SIGCONT, what it had buffered before it learns it was replaced). After each
  failover (``master_kill``, ``master_stall``) the soak reads the room streams of that shard on
  the new master, from 10 s before the fault on; an acknowledged message of that window that
  the stream lacks is counted in ``unreplicated`` (``unreplicated_by_fault``, samples in
  ``unreplicated_samples``), and its deliveries that never came (and no ``recovered: false``
  explains) in ``lost_unreplicated`` (``lost_unreplicated_by_fault``), not in ``lost``;
- ``duplicates``: a (client, message id) received more than once, whether expected or not;
- ``read_events_foreign``: a ``read {room, user, id}`` event whose id no client of that user sent
  in a ``read`` there; ``read_backwards`` (one Redis): one whose id is not above the last that
  connection saw for that user and room, unless a fault that may lose Redis data (``redis_restart``)
  ran in between (``read_backwards_by_fault``). On a cluster the event is published in a second
  round trip after the script, so two instances' events may cross: ``read_events_reordered``,
  reported only;
- ``presence_mismatches``: after the drain, every client connected and idle, each room's
  ``ws:room:<room>:users`` must count each user's joined sessions there, ``ws:rooms`` each room's
  users (and no other room), and each live instance's ``ws:instance:<id>:rooms`` its sessions'
  rooms (a dead instance's: reaped); given 20 s to agree (``presence_settle_s``; samples in
  ``presence_mismatch_samples``);
- ``room_keys_left``: once every client closed, every instance stopped and ``trio-chat clean``
  ran, before any TTL could hide it: any ``ws:room:<room>:users``, member of ``ws:rooms`` or
  ``ws:instance:<id>:rooms`` left; ``bad_read_markers``: a marker in ``ws:read:<room>`` that is
  not the id of a message of that room that its user's clients sent in a ``read``, or a markers
  hash without a TTL (the markers stay until ``history.ttl``, and are not leaked keys);
- after the run: every client closes, every instance is stopped with SIGTERM (each must exit 0),
  then one ``session.ttl`` and one ``trio-chat clean`` later no ``ws:*`` key may be left on
  the one Redis, or on any master of the cluster (``masters_checked``) (``leaked_keys``; the
  reaper's own ``ws:reap:<id>`` locks, which expire in 30 s, are counted apart as
  ``reap_locks``, and the read markers ``ws:read:<room>`` that have a TTL as
  ``read_marker_keys``), and no instance log may hold a traceback;
- ``unexpected_exits``: an instance, redis-server or cluster node (restarted then) that exited
  when nothing signalled it, or not with 0 after SIGTERM (an instance that cannot reach Redis
  while starting exits 1, as documented; that is retried and counted as ``start_failures``).

Output: a progress line every 10 s, then, as the last line of stdout, one JSON object. Exit
status 0 only when ``lost``, ``duplicates``, ``leaked_keys``, ``presence_mismatches``,
``room_keys_left``, ``bad_read_markers``, ``read_backwards``, ``read_events_foreign``,
``unexpected_exits`` and ``tracebacks`` are all 0 (``lost_unreplicated`` may not be: it is
reported, charged to its failover); 1 otherwise; 2 for bad usage (``--cluster`` with ``--netem``
included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import trio
from _soak.children import kill_children  # bench/_soak/: the parts of this script
from _soak.netem import tun_forwarder
from _soak.report import build_report
from _soak.runner import Soak


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="soak.py",
        description="Chat for minutes or hours under crashes, drains, Redis faults and a bad "
        "network, then check that nothing acknowledged was lost, nothing came twice and no "
        "record leaked.",
        epilog="See the module docstring and bench/README.md.",
    )
    parser.add_argument("--minutes", type=float, required=True, help="traffic and faults, minutes")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--rooms", type=int, default=30)
    parser.add_argument(
        "--rate", type=float, help="messages/s from all clients (default clients/10)"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="a Redis Cluster (3 masters, 3 replicas: tests/_redis_cluster.py), not one Redis",
    )
    parser.add_argument("--netem", action="store_true", help="network faults on the link to Redis")
    parser.add_argument(
        "--hooks",
        action="store_true",
        help="the instances ask an HTTP hooks application (bench/peers/hooks_allow.py) on "
        "every hook; one more fault kills and restarts it",
    )
    parser.add_argument(
        "--netem-impl",
        choices=["auto", "tc", "tun"],
        default="auto",
        help="tc: tc netem on a veth pair; tun: a user-space forwarder; auto: tc when it works",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--fault-interval",
        type=float,
        help="seconds between faults, about (default: 15, less in runs under 3 minutes)",
    )
    parser.add_argument(
        "--churn", type=float, default=120.0, help="seconds between a client's normal reconnects"
    )
    parser.add_argument(
        "--visit-every",
        type=float,
        default=30.0,
        help="seconds between a client's visits to another room (join, 1-10 s, leave); 0: none",
    )
    parser.add_argument(
        "--read-every",
        type=float,
        default=10.0,
        help="seconds between a client's read markers; 0: none",
    )
    parser.add_argument("--token-ttl", type=int, default=45, help="seconds a client token lives")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs even when the run passes"
    )
    args = parser.parse_args(argv)
    if args.cluster and args.netem:
        parser.error("--netem: on one Redis only, not with --cluster")
    if args.minutes <= 0 or args.clients < 2 or args.rooms < 1 or args.instances < 1:
        parser.error("--minutes must be > 0, --clients >= 2, --rooms >= 1, --instances >= 1")
    if args.clients > 2000:
        parser.error("--clients: at most 2000 (one process holds them all)")
    if args.fault_interval is None:  # a short run still deals every kind of fault
        args.fault_interval = min(15.0, max(4.0, args.minutes * 60 / 13))
    if args.netem and os.geteuid() != 0:
        parser.error("--netem needs root (ip netns, tc)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_tun-forwarder"]:
        return tun_forwarder(*argv[1:])
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="trio-chat-soak-"))
    soak = Soak(args, workdir)
    began = time.monotonic()
    result: dict[str, Any] = {}
    error = None
    budget = args.minutes * 60 + args.drain_timeout + 240  # set-up, drain, stop, leak check

    async def bounded() -> dict[str, Any]:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def on_sigterm() -> None:
                    async for _ in signals:
                        raise KeyboardInterrupt

                nursery.start_soon(on_sigterm)
                with trio.fail_after(budget):
                    outcome = await soak.run()
                nursery.cancel_scope.cancel()
                return outcome

    try:
        result = trio.run(bounded)
    except BaseException as exc:  # report whatever stopped the soak, as JSON, after cleaning up
        leaves = _leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            error = "interrupted"
        else:
            error = "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves)
            traceback.print_exc()
    finally:
        kill_children()
        if soak.net is not None:
            soak.net.teardown()
    report = build_report(soak, result, error, time.monotonic() - began)
    ok = report["ok"]
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        report["workdir"] = None
    if not ok and report["lost_samples"]:
        print("[soak] lost deliveries, with the recipient's last events:", file=sys.stderr)
        for sample in report["lost_samples"][:5]:
            print(json.dumps(sample, indent=1), file=sys.stderr)
    print(json.dumps(report, sort_keys=False), flush=True)
    return 0 if ok else 1


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


if __name__ == "__main__":
    sys.exit(main())
