"""trio-chat vs python-socketio and Node.js Socket.IO under one Node.js load generator, two
instances each.

For every workload and each system in turn: start a throwaway redis-server on a free port of
127.0.0.1, start two server instances on it, run ``bench/loadgen/loadgen.mjs`` (which prints
its results as JSON), stop the servers and Redis, then do the same for the next system.
Prints one markdown table with every system and the ratios of trio-chat to each of the others
(trio-chat / python-socketio, trio-chat / Node.js Socket.IO). The Node.js peer
(``bench/peers/socketio-node/server.mjs``: socket.io 4.8 with @socket.io/redis-adapter) is
driven by the generator's ``--system socketio`` client, like python-socketio.
``--trio-layout`` changes how trio-chat runs: 2x1 (two processes, the default), 1x1 (one
process) or 1x2 (one ``serve --workers 2`` process: two workers sharing a port).

  A  fan-out: 1 room, --subscribers split over both instances, 1 publisher at each rate
  B  many rooms: --rooms x --members, each member sending --member-rate msg/s
  C  idle connections: --connections, each joining its own room (RSS/connection, opens/s)
  D  connection rate: --connect-connections (2,000), --connect-concurrency (100) at a time,
     each opened and then joined to a room of its own, on ONE instance of every system

``--redis cluster`` runs trio-chat on a Redis Cluster instead (3 masters, the
test fixture tests/_redis_cluster.py, ``redis+cluster://`` URL) and reports Redis CPU per node;
its nodes run at ``--cluster-hz`` (10, like the one redis-server) with ``--cluster-replicas``
replicas per master (1; 0 = three bare masters);
``--redis both`` runs every trio-chat pass on one redis-server, then on a cluster, and prints
them side by side.

Everything it starts is stopped again on success, failure, Ctrl-C or SIGTERM (children also
get SIGTERM if this process dies: PR_SET_PDEATHSIG). Server logs stay in a temporary
directory whose path is printed. Standard library only; run with any Python >= 3.11:

  python3 bench/run.py --quick            # ~2 minutes
  python3 bench/run.py                    # the full run
  python3 bench/run.py --profile 800      # also: py-spy on trio-chat during fan-out at 800/s
  python3 bench/run.py --profile-handshakes 8000   # also: py-spy while C opens 8000 connections
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import tempfile
import time
from pathlib import Path

from _run.processes import (  # bench/_run/: the parts of this script
    _child_setup,
    redis_cluster,
    redis_server,
    stop,
)
from _run.profiling import summarize_profile
from _run.report import print_report
from _run.settings import (
    BENCH,
    BENCH_PYTHON,
    CLUSTER_OPTIONS,
    HISTORY_SIZE,
    LOADGEN,
    NODE_PEER,
    REDIS_LABELS,
    REDIS_MODES,
    SECRET,
    SOURCE_NOTE,
    SYSTEMS,
    TRIO_CONFIG,
    TRIO_ENV,
    TRIO_LAYOUT,
    TRIO_LAYOUTS,
    TRIO_PYTHON,
    BenchError,
    cluster_label,
    percentile,
    token,
)
from _run.systems import (
    connections_by_instance,
    log_notes,
    snapshot_source,
    source_digest,
    system_label,
    trio_chat_server,
)
from _run.workloads import (
    B_PEAK_RATES,
    b_passed,
    describe_connects,
    describe_handshakes,
    one_pass,
    plan,
    profile_fanout,
    profiled,
)

#: what the other bench scripts use of this one, as run.<name> (failover.py, floor.py,
#: replay.py, storm.py)
__all__ = [
    "BENCH_PYTHON",
    "HISTORY_SIZE",
    "LOADGEN",
    "SECRET",
    "TRIO_ENV",
    "BenchError",
    "_child_setup",
    "connections_by_instance",
    "log_notes",
    "percentile",
    "redis_cluster",
    "redis_server",
    "snapshot_source",
    "stop",
    "summarize_profile",
    "token",
    "trio_chat_server",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="rates 50..400, 3 s each; 200 rooms, 5 s; 1000 idle connections",
    )
    parser.add_argument("--workloads", default="A,B,C,D", help="subset of A,B,C,D (A,B,C,D)")
    parser.add_argument(
        "--systems",
        help="a list of trio, socketio (python-socketio), socketio-node (Node.js Socket.IO) "
        "(default: all three; with --redis cluster or both: trio)",
    )
    parser.add_argument(
        "--redis",
        choices=[*REDIS_MODES, "both"],
        default="single",
        help="what trio-chat runs on: single = one redis-server (the default), cluster = a "
        "Redis Cluster of 3 masters (tests/_redis_cluster.py, --cluster-replicas and "
        "--cluster-hz; Redis CPU per node), both = each trio-chat pass on one, then on the "
        "other, side by side (the Socket.IO peers always run on one redis-server)",
    )
    parser.add_argument(
        "--cluster-hz",
        type=int,
        default=10,
        help="the cluster's nodes' hz (10, Redis's default and the one redis-server's; the test "
        "fixture's own default is 100)",
    )
    parser.add_argument(
        "--cluster-replicas",
        type=int,
        choices=[0, 1],
        default=1,
        help="replicas per master of the cluster (1; 0 = three masters without replicas)",
    )
    parser.add_argument("--rates", help="A: msg/s steps (50,100,200,400,800,1600)")
    parser.add_argument("--duration", type=float, help="A: seconds per rate (10)")
    parser.add_argument("--drain", type=float, default=2.0, help="A/B: seconds after last send (2)")
    parser.add_argument("--subscribers", type=int, default=400, help="A: subscribers (400)")
    parser.add_argument(
        "--rooms",
        help="B: rooms (500); a list runs B once per count (how the cost grows with the work)",
    )
    parser.add_argument("--members", type=int, default=4, help="B: members per room (4)")
    parser.add_argument(
        "--member-rate", default="1", help="B: msg/s per member; a list runs B once per rate (1)"
    )
    parser.add_argument("--room-duration", type=float, help="B: seconds of sending (10)")
    parser.add_argument(
        "--b-peak",
        action="store_true",
        help=f"B: also climb the member rates {B_PEAK_RATES} at the first --rooms count, each "
        "system until a rate loses a message or has p99 >= --p99-limit; the report gives "
        "the highest rate that passed",
    )
    parser.add_argument(
        "--rooms-traffic",
        action="store_true",
        help="B (trio-chat only): each member also sends a `signal` before each message and a "
        "`read` for each message it receives (SPEC §15)",
    )
    parser.add_argument("--connections", type=int, help="C: idle connections (5000)")
    parser.add_argument("--concurrency", type=int, default=200, help="opens in flight (200)")
    parser.add_argument(
        "--connect-connections", type=int, default=2000, help="D: connections (2000)"
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=100, help="D: opens+joins in flight (100)"
    )
    parser.add_argument(
        "--late",
        type=float,
        default=3.0,
        help="A/B: after the drain, how long to keep counting late arrivals (3)",
    )
    parser.add_argument(
        "--quiet-max",
        type=float,
        default=60.0,
        help="before each measured window, wait at most this long for the servers "
        "to be idle and other processes to use < 0.25 cores (60; 0 = don't)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="A/B: measure a window again (this many times at most) when other "
        "processes used > 0.4 cores during it (1)",
    )
    parser.add_argument("--p99-limit", type=float, default=250.0, help="A peak: p99 below (250)")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="RATE",
        help="after the comparison: py-spy on both trio-chat instances during a "
        "fan-out step at RATE msg/s",
    )
    parser.add_argument(
        "--profile-seconds",
        type=int,
        default=10,
        help="py-spy seconds: of each --profile recording; at most, of --profile-handshakes (10)",
    )
    parser.add_argument(
        "--profile-out",
        default=str(BENCH / "profile-fanout"),
        help="path prefix of the profile files (bench/profile-fanout)",
    )
    parser.add_argument(
        "--profile-handshakes",
        type=int,
        metavar="N",
        help="after the comparison (and --profile): py-spy on trio-chat while a C pass opens N "
        "connections, --profile-seconds at most and no longer than the opening (8000 take ~7 s "
        "at ~1,200/s)",
    )
    parser.add_argument(
        "--profile-handshakes-out",
        default=str(BENCH / "profile-handshake"),
        help="path prefix of the handshake profile files (bench/profile-handshake)",
    )
    parser.add_argument(
        "--profile-connect",
        type=int,
        metavar="N",
        help="after the rest: py-spy on one trio-chat instance while a D pass opens N "
        "connections and joins each to a new room (--connect-concurrency in flight), from the "
        "start of the opening until the last join",
    )
    parser.add_argument(
        "--profile-connect-out",
        default=str(BENCH / "profile-connect"),
        help="path prefix of the connect profile files (bench/profile-connect)",
    )
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument(
        "--no-snapshot",
        dest="snapshot",
        action="store_false",
        help="run trio-chat from the work tree instead of a copy taken at start",
    )
    parser.add_argument(
        "--trio-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the trio-chat instances (experiments)",
    )
    parser.add_argument(
        "--trio-layout",
        choices=list(TRIO_LAYOUTS),
        default="2x1",
        help="trio-chat processes x workers: 2x1 two instances (the default), 1x1 one, 1x2 "
        "one `serve --workers 2` (the Socket.IO peers always run two instances)",
    )
    parser.add_argument(
        "--trio-config",
        type=Path,
        metavar="FILE",
        help="a TOML file for the trio-chat instances (`serve --config FILE`), e.g. "
        "bench/peers/presence_events.toml ([[rooms]] options are set in a file only)",
    )
    parser.add_argument(
        "--history-size",
        type=int,
        metavar="N",
        help="trio-chat's history.size (TRIO_CHAT_HISTORY_SIZE): messages kept per room; 0 = "
        "history off, a send is a bare PUBLISH (default: the server's default, 200)",
    )
    args = parser.parse_args()
    TRIO_LAYOUT[0] = args.trio_layout
    if not 1 <= args.cluster_hz <= 500:
        parser.error("--cluster-hz must be 1..500 (Redis's range)")
    CLUSTER_OPTIONS.update(hz=args.cluster_hz, replicas_per_master=args.cluster_replicas)
    REDIS_LABELS["cluster"] = cluster_label()
    if args.history_size is not None:
        if args.history_size < 0:
            parser.error("--history-size must be >= 0")
        HISTORY_SIZE[0] = args.history_size
    if args.trio_config is not None:
        if not args.trio_config.is_file():
            parser.error(f"--trio-config: no file {args.trio_config}")
        TRIO_CONFIG[0] = args.trio_config.resolve()  # the instances run in another directory

    for item in args.trio_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("TRIO_CHAT_"):
            parser.error(f"--trio-env wants TRIO_CHAT_KEY=VALUE, not {item!r}")
        TRIO_ENV[key] = value
    plans, budgets, common = plan(args)
    wanted = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    redis_modes = list(REDIS_MODES) if args.redis == "both" else [args.redis]
    default_systems = "trio,socketio,socketio-node" if args.redis == "single" else "trio"
    systems = [s.strip() for s in (args.systems or default_systems).split(",") if s.strip()]
    for peer in ("socketio", "socketio-node"):
        if args.redis == "cluster" and peer in systems:
            parser.error(f"--redis cluster: {SYSTEMS[peer]} runs on one redis-server only")
    if args.redis != "single" and (args.profile or args.profile_handshakes or args.profile_connect):
        parser.error("--profile and --profile-handshakes run on one redis-server only")
    for name in wanted:
        if name not in ("A", "B", "C", "D"):
            parser.error(f"unknown workload {name}")
    workloads = [key for name in wanted for key in plans if key[0] == name]
    for name in systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name}")
    if args.rooms_traffic and systems != ["trio"]:
        parser.error("--rooms-traffic: trio-chat only (--systems trio)")
    for path in (TRIO_PYTHON, LOADGEN / "node_modules"):
        if not path.exists():
            parser.error(f"{path} is missing: run `make bench` (it installs everything)")
    if "socketio" in systems and not BENCH_PYTHON.exists():
        parser.error(f"{BENCH_PYTHON} is missing: run `make bench`")
    if "socketio-node" in systems and not (NODE_PEER / "node_modules").exists():
        parser.error(f"{NODE_PEER / 'node_modules'} is missing: run `make bench`")

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    logs = Path(tempfile.mkdtemp(prefix="trio-chat-bench-"))
    digest_at_start = source_digest()
    if args.snapshot:
        SOURCE_NOTE[0] = snapshot_source(logs)
        print(f"trio-chat under test: {SOURCE_NOTE[0]}", file=sys.stderr)
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, object]]] = {
        s: {} for s in systems if "single" in redis_modes or s != "trio"
    }
    cluster_results: dict[str, dict[str, dict[str, object]]] = {"trio": {}}
    failed: list[str] = []

    def past_peak(name: str, system: str, redis: str) -> bool:
        """A lower member rate of the same B failed the peak's limits for this system."""
        rooms, rate = name[1:].split("@")
        done = (cluster_results if redis == "cluster" else results).get(system, {})
        return any(
            key.startswith(f"B{rooms}@")
            and float(key.split("@")[1]) < float(rate)
            and not b_passed(result, args.p99_limit)
            for key, result in done.items()
        ) or any(
            f"{system_label(system)} on {REDIS_LABELS[redis]} B{rooms}@" in failure
            for failure in failed
        )

    for name in workloads:
        workload, options = plans[name]
        for system in systems:
            for redis in redis_modes if system == "trio" else ["single"]:
                where = f"{system_label(system)} on {REDIS_LABELS[redis]} {name}"
                if args.b_peak and name.startswith("B") and past_peak(name, system, redis):
                    print(f"\n== {where}: skipped, a lower rate failed", file=sys.stderr)
                    continue
                try:
                    budget = budgets[name[0]]
                    result = one_pass(system, workload, options, budget, logs, redis=redis)
                    (cluster_results if redis == "cluster" else results)[system][name] = result
                except BenchError as exc:
                    failed.append(f"{where}: {exc}")
                    print(f"FAILED: {where}: {exc}", file=sys.stderr)
    profile = profile_fanout(args, common, logs, failed) if args.profile else (None, None)
    handshakes: tuple[dict[str, object] | None, str | None] = (None, None)
    if args.profile_handshakes:
        handshakes = profiled(
            args,
            logs,
            failed,
            "profile-handshakes",
            "idle",
            {**common, "connections": args.profile_handshakes},
            {
                "seconds": args.profile_seconds,
                "out": args.profile_handshakes_out,
                "opening": args.profile_handshakes,
            },
            b"idle trio: opening ",
            functools.partial(describe_handshakes, args),
        )
    connect: tuple[dict[str, object] | None, str | None] = (None, None)
    if args.profile_connect:
        connect = profiled(
            args,
            logs,
            failed,
            "profile-connect",
            "connect",
            {
                **common,
                "connections": args.profile_connect,
                "concurrency": args.connect_concurrency,
            },
            {
                "seconds": max(args.profile_seconds, 60),
                "out": args.profile_connect_out,
                "until": b"all opened and joined",
            },
            b"connections opened and joined,",
            functools.partial(describe_connects, args),
        )
    print_report(
        args,
        systems=systems,
        redis_modes=redis_modes,
        results=results,
        cluster_results=cluster_results,
        profile=profile,
        handshakes=handshakes,
        connect=connect,
        failed=failed,
        started=started,
        logs=logs,
    )
    if not args.snapshot and source_digest() != digest_at_start:
        print(
            "WARNING: trio_chat/**/*.py changed on disk during the run: passes may have measured "
            "different code",
            file=sys.stderr,
        )
    for failure in failed:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
