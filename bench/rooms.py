"""What rooms traffic costs (SPEC §15): workload B as today vs B where every member also sends
a ``signal`` (typing) before each message and a ``read`` for each message it receives; and
workload D (connect + join) with ``presence_events`` off vs on. Side by side in one run.

    python3 bench/rooms.py [--rounds 2] [--parts B,D] [--rooms 500] [--members 4]
                           [--member-rate 0.25] [--duration 10] [--connections 2000]
                           [--concurrency 100] [--b-variants plain,signals,reads,rooms]
                           [--d-variants off,table,on] [--profile [VARIANT]] [--json FILE]

Each pass is one of bench/run.py's passes on trio-chat (a throwaway redis-server, the Node.js
load generator, the instances run from a copy of trio_chat/ taken at the start):

- **B**: two instances; ``--rooms`` rooms of ``--members`` members, each member sending
  ``--member-rate`` messages per second for ``--duration`` seconds. ``plain`` is run.py's B;
  ``rooms`` is the same with the generator's ``--rooms-traffic both``: a ``signal`` half a
  member's interval before each of its messages, and a ``read`` of every message received as
  soon as it arrives (each read moves the member's marker, so the room's other members get a
  ``read`` frame); ``signals`` and ``reads`` are each half of it alone. Per pass: messages
  sent, delivered per second, delivery p50/p99 (send to receipt), signal and read frames
  received against expected (reads: at most, since the server merges a read waiting in its
  outbox into the next of its room), the instances' CPU (s/s) and the CPU per send: their CPU
  seconds over the window (signals and reads included) over the messages sent; "net of idle"
  less the instances' idle CPU, read for ``--idle-sample`` seconds just before the window.
- **D**: one instance; ``--connections`` clients, ``--concurrency`` at a time, each opened
  and joined to a room of its own. ``off`` has no configuration file (run.py's D), ``table``
  a ``[[rooms]] match = "*"`` table with ``presence_events = false``
  (peers/rooms_table.toml), ``on`` the same with ``presence_events = true``
  (peers/presence_events.toml). Per pass: opened and joined per second, join p50/p99, the
  instance's CPU (s/s) and its CPU per connection (open + join).

The variants run in turn, ``--rounds`` times (plain, signals, reads, rooms, plain...; off,
table, on, off...), so that a drift of the machine falls on all of them alike. ``--profile``
then runs one more B pass (of ``rooms``, or of the variant named) with py-spy on both
instances, from a second after the sending starts for ``--profile-seconds``
(bench/profile-rooms-* for ``rooms``, bench/profile-rooms-<variant>-* for another; py-spy
from ``$BENCH_PYTHON``'s directory, as run.py's --profile).

Needs what `make bench` installs (the load generator's node_modules).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _run.profiling import write_profile_summary
from _run.report import fmt
from _run.settings import BENCH, LOADGEN, PEERS, SOURCE_NOTE, TRIO_CONFIG, BenchError
from _run.systems import snapshot_source
from _run.workloads import one_pass

#: B's variants: the generator's --rooms-traffic ("": none)
B_VARIANTS = {"plain": "", "signals": "signals", "reads": "reads", "rooms": "both"}
#: a window in which the rest of the machine used more cores than this is measured again
DISTURBED = 0.4
#: D's variants: the configuration file the instance gets (None: none)
D_VARIANTS: dict[str, Path | None] = {
    "off": None,
    "table": PEERS / "rooms_table.toml",
    "on": PEERS / "presence_events.toml",
}


def variants(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name not in known:
            parser.error(f"unknown variant {name!r} (of {', '.join(known)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="passes of each variant (2)")
    parser.add_argument("--parts", default="B,D", help="B, D or both (B,D)")
    parser.add_argument("--rooms", type=int, default=500, help="B: rooms (500)")
    parser.add_argument("--members", type=int, default=4, help="B: members per room (4)")
    parser.add_argument(
        "--member-rate", type=float, default=0.25, help="B: msg/s per member (0.25)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="B: seconds of sending (10)")
    parser.add_argument("--connections", type=int, default=2000, help="D: connections (2000)")
    parser.add_argument("--concurrency", type=int, default=100, help="D: in flight (100)")
    parser.add_argument(
        "--b-variants", default=",".join(B_VARIANTS), help="of plain, signals, reads, rooms (all)"
    )
    parser.add_argument("--d-variants", default="off,table,on", help="of off, table, on (all)")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="rooms",
        choices=list(B_VARIANTS),
        metavar="VARIANT",
        help="then py-spy on one more B pass of VARIANT (rooms)",
    )
    parser.add_argument("--profile-seconds", type=int, default=8, help="py-spy seconds (8)")
    parser.add_argument(
        "--idle-sample",
        type=float,
        default=3.0,
        help="B: seconds of the instances' idle CPU read before each window (3)",
    )
    parser.add_argument(
        "--quiet-max",
        type=float,
        default=60.0,
        help="before each window, wait at most this long for the machine to be quiet (60)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a window again (this many times at most) when other processes used > 0.4 "
        "cores during it (2)",
    )
    parser.add_argument("--json", type=Path, help="write every pass's result here")
    args = parser.parse_args(argv)
    args.parts = [p.strip().upper() for p in args.parts.split(",") if p.strip()]
    if not set(args.parts) <= {"B", "D"}:
        parser.error("--parts: B, D or B,D")
    args.b_variants = variants(parser, args.b_variants, tuple(B_VARIANTS))
    args.d_variants = variants(parser, args.d_variants, tuple(D_VARIANTS))
    if not (LOADGEN / "node_modules").exists():
        parser.error(f"{LOADGEN / 'node_modules'} is missing: run `make bench`")
    return args


def cpu_us(result: dict[str, Any], count_key: str) -> float | None:
    """The instances' CPU over the measured window per ``result[count_key]`` (messages sent, or
    connections joined), in microseconds."""
    cpu, wall, count = result.get("server_cpu"), result.get("wall_s"), result.get(count_key)
    if not isinstance(cpu, int | float) or not isinstance(wall, int | float):
        return None
    if not isinstance(count, int) or not count:
        return None
    return float(cpu * wall / count * 1e6)


def table(rows: list[list[str]]) -> str:
    """A Markdown table; the first row is the header, the first two columns are text."""
    align = ["---"] * 2 + ["---:"] * (len(rows[0]) - 2)
    return "\n".join("| " + " | ".join(row) + " |" for row in [rows[0], align, *rows[1:]])


def got(result: dict[str, Any], kind: str) -> str:
    """Signal or read frames of a B pass, "received/expected" at the end of the window, and
    those that came in the --late seconds after it ("—" without them). Reads expected is an
    upper bound: the server merges a read waiting in its outbox into the next of its room."""
    if f"{kind}_expected" not in result:
        return "—"
    received = result[f"{kind}_received"]
    late = result.get(f"{kind}_received_after_late", received) - received
    return f"{received:,}/{result[f'{kind}_expected']:,}" + (f" (+{late:,} late)" if late else "")


def idle_cpu(result: dict[str, Any]) -> float | None:
    """The instances' CPU (s/s) over the --idle-sample seconds before the window."""
    value = result.get("idle_server_cpu")
    return value if isinstance(value, int | float) else None


def net_cpu_us(result: dict[str, Any]) -> float | None:
    """CPU per send as cpu_us(), less what the instances used idle (heartbeats, timers)."""
    gross, idle = cpu_us(result, "sent"), idle_cpu(result)
    if gross is None or idle is None:
        return None
    return float(gross - idle * result["wall_s"] / result["sent"] * 1e6)


def versus(value: float, base: float) -> str:
    return f"{value / base - 1:+.1%}" if base else "—"


def report_b(args: argparse.Namespace, passes: dict[str, list[dict[str, Any]]]) -> None:
    columns = ("sent", "delivered_per_s", "p50_ms", "p99_ms", "lost", "server_cpu", "other_cpu")
    rows = [["B", "pass", *columns, "idle CPU", "signal frames", "read frames (of at most)",
             "errors", "CPU µs/send", "net of idle"]]  # fmt: skip
    for variant, results in passes.items():
        for n, r in enumerate(results, 1):
            errors = sum(r.get("errors", {}).values())
            rows.append([variant, str(n), *(fmt(r.get(c)) for c in columns), fmt(idle_cpu(r)),
                         got(r, "signals"), got(r, "reads"), fmt(errors), fmt(cpu_us(r, "sent")),
                         fmt(net_cpu_us(r))])  # fmt: skip
    print(f"\nworkload B: {args.rooms} rooms, {args.members} members each sending "
          f"{args.member_rate:g}/s for {args.duration:g} s; two instances on one "
          f"redis-server\n")  # fmt: skip
    print(table(rows))
    means = {
        variant: {
            "delivered": statistics.mean(r["delivered_per_s"] for r in results),
            "p50": statistics.mean(r["p50_ms"] for r in results),
            "p99": statistics.mean(r["p99_ms"] for r in results),
            "cpu": statistics.mean(cpu_us(r, "sent") or 0.0 for r in results),
            "net": statistics.mean(net_cpu_us(r) or 0.0 for r in results),
        }
        for variant, results in passes.items()
        if results
    }
    base = means.get("plain")
    rows = [["B", "", "delivered msg/s", "p50 ms", "p99 ms", "CPU µs/send", "vs plain",
             "net of idle", "vs plain"]]  # fmt: skip
    for variant, m in means.items():
        added = versus(m["cpu"], base["cpu"]) if base else "—"
        net = versus(m["net"], base["net"]) if base else "—"
        rows.append([variant, "", f"{m['delivered']:,.0f}", f"{m['p50']:.2f}", f"{m['p99']:.1f}",
                     f"{m['cpu']:,.0f}", added, f"{m['net']:,.0f}", net])  # fmt: skip
    print("\nmeans:\n")
    print(table(rows))


def report_d(args: argparse.Namespace, passes: dict[str, list[dict[str, Any]]]) -> None:
    rows = [["D", "pass", "joined", "opened+joined/s", "open p50", "join p50", "join p99",
             "server_cpu", "redis_cpu", "other_cpu", "events", "CPU µs/connect"]]  # fmt: skip
    for variant, results in passes.items():
        for n, r in enumerate(results, 1):
            rows.append([variant, str(n), fmt(r.get("joined")), fmt(r.get("opened_joined_per_s")),
                         fmt(r["open_latency"].get("p50_ms")), fmt(r["join_latency"].get("p50_ms")),
                         fmt(r["join_latency"].get("p99_ms")), fmt(r.get("server_cpu")),
                         fmt(r.get("redis_cpu")), fmt(r.get("other_cpu")),
                         json.dumps(r.get("events", {})), fmt(cpu_us(r, "joined"))])  # fmt: skip
    print(f"\nworkload D: {args.connections:,} connections, {args.concurrency} in flight, each "
          "opened and joined to a room of its own; one instance\n")  # fmt: skip
    print(table(rows))
    means = {
        variant: {
            "rate": statistics.mean(r["opened_joined_per_s"] for r in results),
            "cpu": statistics.mean(cpu_us(r, "joined") or 0.0 for r in results),
        }
        for variant, results in passes.items()
        if results
    }
    base = means.get("off")
    rows = [["D", "", "opened+joined/s", "vs off", "CPU µs/connect", "vs off"]]
    for variant, m in means.items():
        rate = versus(m["rate"], base["rate"]) if base else "—"
        cpu = versus(m["cpu"], base["cpu"]) if base else "—"
        rows.append([variant, "", f"{m['rate']:,.0f}", rate, f"{m['cpu']:,.0f}", cpu])
    print("\nmeans:\n")
    print(table(rows))


def connect_pass(
    args: argparse.Namespace, options: dict[str, object], budget: float, logs: Path
) -> dict[str, Any]:
    """One D pass; again (--retries times at most) when other processes used > 0.4 cores
    during its window, as the generator does for B's (the discarded ones are kept in it)."""
    disturbed: list[dict[str, Any]] = []
    while True:
        result: dict[str, Any] = one_pass("trio", "connect", options, budget, logs)
        if len(disturbed) >= args.retries or (result.get("other_cpu") or 0) <= DISTURBED:
            result["disturbed_attempts"] = disturbed
            return result
        print(f"other processes used {result['other_cpu']} cores: D again", file=sys.stderr)
        kept = ("other_cpu", "server_cpu", "opened_joined_per_s", "wall_s")
        disturbed.append({k: result.get(k) for k in kept})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common: dict[str, object] = {"quiet-max": args.quiet_max, "late": 5, "retries": args.retries}
    b_options: dict[str, object] = {
        **common,
        "concurrency": 200,
        "rooms": args.rooms,
        "members": args.members,
        "member-rate": args.member_rate,
        "duration": args.duration,
        "drain": 2,
        "idle-sample": args.idle_sample,
    }
    d_options: dict[str, object] = {
        **common,
        "connections": args.connections,
        "concurrency": args.concurrency,
    }
    b_window = args.duration + args.idle_sample + 2 + 5 + args.quiet_max
    b_budget = (1 + args.retries) * b_window + 240
    d_budget = args.connections / 20 + args.quiet_max + 240
    logs = Path(tempfile.mkdtemp(prefix="trio-chat-rooms-bench-"))
    SOURCE_NOTE[0] = snapshot_source(logs)
    print(f"trio-chat under test: {SOURCE_NOTE[0]}", file=sys.stderr)
    b_passes: dict[str, list[dict[str, Any]]] = {v: [] for v in args.b_variants}
    d_passes: dict[str, list[dict[str, Any]]] = {v: [] for v in args.d_variants}
    profile: dict[str, Any] | None = None
    try:
        for _ in range(args.rounds):
            for variant in args.b_variants if "B" in args.parts else []:
                traffic = B_VARIANTS[variant]
                options = {**b_options, **({"rooms-traffic": traffic} if traffic else {})}
                b_passes[variant].append(one_pass("trio", "rooms", options, b_budget, logs))
            for variant in args.d_variants if "D" in args.parts else []:
                TRIO_CONFIG[0] = D_VARIANTS[variant]
                try:
                    d_passes[variant].append(connect_pass(args, d_options, d_budget, logs))
                finally:
                    TRIO_CONFIG[0] = None
        if args.profile:
            variant = args.profile
            out = str(
                BENCH / ("profile-rooms" if variant == "rooms" else f"profile-rooms-{variant}")
            )
            seconds = args.profile_seconds
            traffic = B_VARIANTS[variant]
            options = {**b_options, **({"rooms-traffic": traffic} if traffic else {})}
            options["duration"] = max(args.duration, seconds + 4)
            profile = one_pass("trio", "rooms", options, b_budget + 4 * seconds, logs,
                               profile={"seconds": seconds, "out": out})  # fmt: skip
            write_profile_summary(
                profile,
                out,
                f"trio-chat B, variant {variant} (--rooms-traffic {traffic or 'none'}; "
                f"{args.rooms} rooms x {args.members}, {args.member_rate:g}/s each) while "
                f"profiled: delivered {profile['received']}/{profile['expected']}, p50 "
                f"{profile['p50_ms']} ms, p99 {profile['p99_ms']} ms, server CPU "
                f"{profile['server_cpu']} s/s (each {profile['server_cpu_each']}); "
                f"{SOURCE_NOTE[0]}",
            )
            print(f"profile: {out}-summary.txt", file=sys.stderr)
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"\ntrio-chat: {SOURCE_NOTE[0]}; logs in {logs}")
    if "B" in args.parts:
        report_b(args, b_passes)
    if "D" in args.parts:
        report_d(args, d_passes)
    if args.json:
        args.json.write_text(json.dumps({
            "args": {**vars(args), "json": str(args.json)},
            "source": SOURCE_NOTE[0],
            "b_passes": b_passes,
            "d_passes": d_passes,
            "profile": profile,
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
