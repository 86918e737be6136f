"""What the application's hooks cost (SPEC §14): workload B with no hooks, with a Python
``send`` hook that allows, and with the HTTP ``send`` hook against an application that checks
the signature and allows, side by side in one run.

    python3 bench/hooks.py [--rounds 2] [--rooms 500] [--members 4] [--member-rate 1]
                           [--duration 10] [--variants none,python,http] [--json FILE]

Each pass is bench/run.py's workload B on trio-chat (two instances on one redis-server, the
Node.js load generator): ``--rooms`` rooms of ``--members`` members, each member sending
``--member-rate`` messages per second for ``--duration`` seconds. The variants run in turn,
``--rounds`` times (none, python, http, none, python, http...), so that a drift of the
machine falls on all of them alike. Per pass: messages sent, delivered per second, delivery
p50/p99 (send to receipt, the hook's time included), the instances' CPU (s/s) and the CPU per
send (the instances' CPU seconds over the sends: fan-out, Redis and the hook all in it). The
HTTP application runs in processes of its own (peers/hooks_allow.py, one per instance): its
CPU is not in the instances' figure.

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

from _run.report import fmt
from _run.settings import HOOK_VARIANTS, LOADGEN, TRIO_HOOKS, BenchError
from _run.workloads import one_pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="passes of each variant (2)")
    parser.add_argument("--rooms", type=int, default=500, help="rooms (500)")
    parser.add_argument("--members", type=int, default=4, help="members per room (4)")
    parser.add_argument("--member-rate", type=float, default=1.0, help="msg/s per member (1)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending (10)")
    parser.add_argument(
        "--variants", default=",".join(HOOK_VARIANTS), help="of none, python, http (all three)"
    )
    parser.add_argument("--json", type=Path, help="write every pass's result here")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in args.variants:
        if variant not in HOOK_VARIANTS:
            parser.error(f"unknown variant {variant!r} (of {', '.join(HOOK_VARIANTS)})")
    if not (LOADGEN / "node_modules").exists():
        parser.error(f"{LOADGEN / 'node_modules'} is missing: run `make bench`")
    return args


def cpu_per_send_us(result: dict[str, Any]) -> float | None:
    """The instances' CPU per message sent, in microseconds."""
    cpu, sent, seconds = result.get("server_cpu"), result.get("sent"), result.get("duration_s")
    if not isinstance(cpu, int | float) or not isinstance(sent, int) or not sent:
        return None
    assert isinstance(seconds, int | float)
    return cpu * seconds / sent * 1e6


def table(rows: list[list[str]]) -> str:
    """A Markdown table; the first row is the header, the first two columns are text."""
    align = ["---"] * 2 + ["---:"] * (len(rows[0]) - 2)
    return "\n".join("| " + " | ".join(row) + " |" for row in [rows[0], align, *rows[1:]])


def report(args: argparse.Namespace, passes: dict[str, list[dict[str, Any]]], logs: Path) -> None:
    """Every pass, then each variant's means against "none" (when it ran)."""
    columns = ("sent", "delivered_per_s", "p50_ms", "p99_ms", "lost", "server_cpu")
    rows = [["hooks", "pass", *columns, "refused", "CPU µs/send"]]
    for variant, results in passes.items():
        for n, r in enumerate(results, 1):
            refused = sum(r.get("errors", {}).values())
            rows.append([variant, str(n), *(fmt(r.get(c)) for c in columns), fmt(refused),
                         fmt(cpu_per_send_us(r))])  # fmt: skip
    print(f"\nworkload B: {args.rooms} rooms, {args.members} members each sending "
          f"{args.member_rate:g}/s for {args.duration:g} s; two instances on one redis-server; "
          f"logs in {logs}\n")  # fmt: skip
    print(table(rows))
    means = {
        variant: {
            "p50_ms": statistics.mean(r["p50_ms"] for r in results),
            "p99_ms": statistics.mean(r["p99_ms"] for r in results),
            "cpu": statistics.mean(cpu_per_send_us(r) or 0.0 for r in results),
        }
        for variant, results in passes.items()
    }
    if "none" not in means:
        return
    base = means["none"]
    rows = [["hooks", "", "mean p50 ms", "added p50 ms", "mean p99 ms", "CPU µs/send", "vs none"]]
    for variant, m in means.items():
        added = m["p50_ms"] - base["p50_ms"]
        ratio = m["cpu"] / base["cpu"] - 1
        rows.append([variant, "", f"{m['p50_ms']:.2f}", f"{added:+.2f}", f"{m['p99_ms']:.2f}",
                     f"{m['cpu']:.0f}", f"{ratio:+.1%}"])  # fmt: skip
    print()
    print(table(rows))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options: dict[str, object] = {
        "concurrency": 200,
        "quiet-max": 20,
        "late": 5,
        "retries": 1,
        "rooms": args.rooms,
        "members": args.members,
        "member-rate": args.member_rate,
        "duration": args.duration,
        "drain": 2,
    }
    budget = 2 * (args.duration + 2 + 5 + 20) + 240
    logs = Path(tempfile.mkdtemp(prefix="trio-chat-hooks-bench-"))
    passes: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            TRIO_HOOKS[0] = variant
            try:
                passes[variant].append(one_pass("trio", "rooms", options, budget, logs))
            except BenchError as exc:
                print(f"FAILED: {variant}: {exc}", file=sys.stderr)
                return 1
    report(args, passes, logs)
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)},
                                         "passes": passes}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
