"""What run.py prints at the end: one table with every system and the ratios of trio-chat to
the others, the conditions of each measured window, what was seen in the logs, the single
Redis vs cluster comparison, the versions, and the JSON file of --json."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .settings import (
    BENCH_PYTHON,
    CLUSTER_OPTIONS,
    LABEL_REDIS,
    LAYOUT_NOTES,
    LOADGEN,
    NODE_PEER,
    RATIO_NAMES,
    REDIS_LABELS,
    ROOT,
    SOURCE_NOTE,
    SYSTEMS,
    TRIO_LAYOUTS,
    TRIO_PYTHON,
)
from .systems import system_label

if TYPE_CHECKING:
    import argparse


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value >= 1000 or (value == int(value) and abs(value) >= 100):
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio(a: object, b: object) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "—"
    if b == 0:
        return "—" if a == 0 else "∞"
    return f"{a / b:.2f}"


def cpu_per_delivery(step: dict[str, object]) -> float | None:
    """Server CPU microseconds per delivered message over the measured window (which runs
    from the first send until everything arrived or the drain ended)."""
    cores, wall, received = step.get("server_cpu"), step.get("wall_s"), step.get("received")
    if not all(isinstance(v, (int, float)) for v in (cores, wall, received)) or not received:
        return None
    return round(cores * wall / received * 1e6, 3)  # type: ignore[operator]


def peak(steps: list[dict[str, object]], p99_limit: float) -> object:
    """Highest rate with no loss and p99 under the limit (None when there is none)."""
    good = [
        s["rate"]
        for s in steps
        if s.get("lost") == 0
        and isinstance(s.get("p99_ms"), (int, float))
        and s["p99_ms"] < p99_limit  # type: ignore[operator]
    ]
    return max(good) if good else None  # type: ignore[type-var]


def cpu_per_send(result: dict[str, object]) -> float | None:
    """B: server CPU microseconds per message sent (every member sends at the member rate)."""
    cores, rooms, members = result.get("server_cpu"), result.get("rooms"), result.get("members")
    rate = result.get("member_rate")
    if not all(isinstance(v, (int, float)) for v in (cores, rooms, members, rate)):
        return None
    return round(cores / (rooms * members * float(rate)) * 1e6)  # type: ignore[operator]


def b_peak(
    results: dict[str, dict[str, dict[str, object]]],
    result: dict[str, object],
    keys: list[str],
    p99_limit: float,
) -> object:
    """The highest member rate among B passes ``keys`` of the system ``result`` belongs to
    that lost nothing with p99 under the limit (None when none did)."""
    system = next(s for s, by in results.items() if result in by.values())
    good = [
        float(key.split("@")[1])
        for key in keys
        if key in results[system]
        and results[system][key].get("lost") == 0
        and isinstance(p99 := results[system][key].get("p99_ms"), (int, float))
        and p99 < p99_limit
    ]
    return max(good) if good else None


def present(results: dict[str, dict[str, dict[str, object]]]) -> list[str]:
    """The systems with results, in SYSTEMS' order (trio-chat first)."""
    return [s for s in SYSTEMS if results.get(s)]


def first(results: dict[str, dict[str, dict[str, object]]], key: str) -> dict[str, object] | None:
    """Workload ``key``'s result of the first system that has one."""
    for system in SYSTEMS:
        if key in results.get(system, {}):
            return results[system][key]
    return None


def table(results: dict[str, dict[str, dict[str, object]]], p99_limit: float) -> str:
    """One column per system, then trio-chat / each other system (when trio-chat ran)."""
    rows: list[list[str]] = []
    systems = present(results)
    others = [s for s in systems if s != "trio"] if "trio" in systems else []

    def row(label: str, metric: str, key: str | None, get: object, better: str) -> None:
        values = {
            s: get(results[s][key]) if key in results.get(s, {}) else None  # type: ignore[operator]
            for s in systems
        }
        rows.append(
            [
                label,
                f"{metric} ({better})",
                *(fmt(values[s]) for s in systems),
                *(ratio(values["trio"], values[s]) for s in others),
            ]
        )

    if (any_result := first(results, "A")) is not None:
        subs = any_result["steps"][0].get("subscribers")  # type: ignore[index]
        for index, step in enumerate(any_result["steps"]):  # type: ignore[arg-type]
            rate = step["rate"]
            label = f"A fan-out {rate}/s × {subs}"  # noqa: RUF001

            def pick(field: str, i: int = index) -> object:
                return lambda r: r["steps"][i].get(field) if i < len(r["steps"]) else None

            def per_delivery(i: int = index) -> object:
                return lambda r: cpu_per_delivery(r["steps"][i]) if i < len(r["steps"]) else None

            row(label, "delivered msg/s", "A", pick("delivered_per_s"), "↑")
            row(label, "p50 ms", "A", pick("p50_ms"), "↓")
            row(label, "p99 ms", "A", pick("p99_ms"), "↓")
            row(label, "max ms", "A", pick("max_ms"), "↓")
            row(label, "lost msgs", "A", pick("lost"), "↓")
            row(label, "server CPU s/s", "A", pick("server_cpu"), "↓")
            row(label, "server CPU µs/delivery", "A", per_delivery(), "↓")
            row(label, "Redis CPU s/s", "A", pick("redis_cpu"), "↓")
        row(
            f"A peak (0 loss, p99 < {p99_limit:g} ms)",
            "msg/s",
            "A",
            lambda r: peak(r["steps"], p99_limit),
            "↑",
        )
    b_keys = sorted(
        {k for r in results.values() for k in r if k.startswith("B")},
        key=lambda k: (int(k[1:].split("@")[0]), -float(k.split("@")[1])),
    )
    for key in b_keys:
        any_b = cast("dict[str, Any]", first(results, key))
        rate = any_b["member_rate"]
        label = f"B {any_b['rooms']} rooms × {any_b['members']}, {rate}/s each"  # noqa: RUF001
        if any_b.get("rooms_traffic"):
            label += ", + a signal per send and a read per delivery"
        row(label, "delivered msg/s", key, lambda r: r.get("delivered_per_s"), "↑")
        row(label, "p50 ms", key, lambda r: r.get("p50_ms"), "↓")
        row(label, "p99 ms", key, lambda r: r.get("p99_ms"), "↓")
        row(label, "max ms", key, lambda r: r.get("max_ms"), "↓")
        row(label, "lost msgs", key, lambda r: r.get("lost"), "↓")
        row(label, "server CPU s/s", key, lambda r: r.get("server_cpu"), "↓")
        row(label, "server CPU µs/send", key, cpu_per_send, "↓")
        row(label, "Redis CPU s/s", key, lambda r: r.get("redis_cpu"), "↓")
    for rooms in sorted({int(k[1:].split("@")[0]) for k in b_keys}):
        mine = [k for k in b_keys if k.startswith(f"B{rooms}@")]
        if len(mine) < 2:
            continue
        row(
            f"B peak, {rooms} rooms (0 loss, p99 < {p99_limit:g} ms)",
            "msg/s per member",
            mine[0],
            lambda r, mine=mine: b_peak(results, r, mine, p99_limit),
            "↑",
        )
    if (any_c := first(results, "C")) is not None:
        label = f"C {any_c['connections']:,} idle, {any_c['concurrency']} in flight"
        row(label, "connections opened/s", "C", lambda r: r.get("opened_per_s"), "↑")
        row(label, "open p99 ms", "C", lambda r: r["open_latency"].get("p99_ms"), "↓")
        row(label, "joins/s", "C", lambda r: r.get("joins_per_s"), "↑")
        row(label, "server RSS KiB/conn", "C", lambda r: r.get("kib_per_connection"), "↓")
        row(label, "failed opens", "C", lambda r: r["connections"] - r["connected"], "↓")
    if (any_d := first(results, "D")) is not None:
        label = (
            f"D {any_d['connections']:,} opened + each joined to a new room, one instance, "
            f"{any_d['concurrency']} in flight"
        )
        row(label, "opened and joined/s", "D", lambda r: r.get("opened_joined_per_s"), "↑")
        row(label, "total s", "D", lambda r: r.get("total_s"), "↓")
        row(label, "open p50 ms", "D", lambda r: r["open_latency"].get("p50_ms"), "↓")
        row(label, "open p99 ms", "D", lambda r: r["open_latency"].get("p99_ms"), "↓")
        row(label, "join p50 ms", "D", lambda r: r["join_latency"].get("p50_ms"), "↓")
        row(label, "join p99 ms", "D", lambda r: r["join_latency"].get("p99_ms"), "↓")
        row(label, "server CPU s/s", "D", lambda r: r.get("server_cpu"), "↓")
        row(label, "Redis CPU s/s", "D", lambda r: r.get("redis_cpu"), "↓")
        row(label, "failed", "D", lambda r: r["connections"] - r["joined"], "↓")
    header = [
        "workload",
        "metric (better)",
        *(system_label(s) for s in systems),
        *(f"ratio trio/{RATIO_NAMES[s]}" for s in others),
    ]
    lines = [header, ["---"] * 2 + ["---:"] * (len(header) - 2), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _redis_windows(result: dict[str, object], key: str) -> list[tuple[str, dict[str, object]]]:
    """The measured windows of one A or B result, with their labels (C has no per-node CPU)."""
    if key == "A":
        steps = cast("list[dict[str, object]]", result["steps"])
        return [(f"A fan-out {s['rate']}/s × {s.get('subscribers')}", s) for s in steps]  # noqa: RUF001
    if key.startswith("B"):
        label = f"B {result['rooms']} rooms × {result['members']}, {result['member_rate']}/s each"  # noqa: RUF001
        return [(label, result)]
    return []


def redis_comparison(
    single: dict[str, dict[str, object]], cluster: dict[str, dict[str, object]]
) -> str:
    """trio-chat on one redis-server vs on the Redis Cluster, window by window (A, B), and the
    Redis CPU of each cluster node against the one redis-server's."""
    out: list[str] = []
    header = ["window", "metric (better)", REDIS_LABELS["single"], REDIS_LABELS["cluster"]]
    lines = [[*header, "ratio cluster/single"], ["---"] * 2 + ["---:"] * 3]
    nodes_header = ["window", "node", "port", "slots", "B rooms", "CPU s/s", "idle CPU s/s"]
    nodes_header.append("× one redis-server")  # noqa: RUF001
    nodes_header += ["commands (run)", "commands / read", "writes", "shard-publish bus msgs"]
    node_lines = [nodes_header, ["---"] * 3 + ["---:"] * 9]

    def counted(node: dict[str, object]) -> list[str]:
        c = cast("dict[str, int]", node.get("counters") or {})
        reads = c.get("total_reads_processed")
        return [
            fmt(c.get("total_commands_processed")),
            ratio(c.get("total_commands_processed"), reads),
            fmt(c.get("total_writes_processed")),
            fmt(c.get("cluster_stats_messages_publishshard_sent")),
        ]

    verdicts: list[str] = []
    for key in sorted(cluster):
        windows = _redis_windows(cluster[key], key)
        singles = dict(_redis_windows(single[key], key)) if key in single else {}
        for label, window in windows:
            other = singles.get(label, {})
            each = cast("list[float]", window.get("redis_cpu_each") or [])
            nodes = cast("list[dict[str, object]]", cluster[key].get("redis_nodes") or [])
            idle = cast("list[float]", cluster[key].get("redis_idle_cpu_each") or [])
            masters = [v for v, n in zip(each, nodes, strict=False) if n["role"] == "master"]
            replicas = [v for v, n in zip(each, nodes, strict=False) if n["role"] == "replica"]
            derived = {
                "redis_max_master": max(masters) if masters else None,
                "redis_max_replica": max(replicas) if replicas else None,
            }
            metrics = [
                ("delivered msg/s", "delivered_per_s", "↑"),
                ("p50 ms", "p50_ms", "↓"),
                ("p99 ms", "p99_ms", "↓"),
                ("max ms", "max_ms", "↓"),
                ("lost msgs", "lost", "↓"),
                ("server CPU s/s", "server_cpu", "↓"),
                ("Redis CPU s/s, all nodes", "redis_cpu", "↓"),
                ("Redis CPU s/s, busiest master", "redis_max_master", "↓"),
                ("Redis CPU s/s, busiest replica", "redis_max_replica", "↓"),
            ]
            for name, field, better in metrics:
                a: object
                if field in derived:  # one redis-server is the only "master" there
                    a = other.get("redis_cpu") if field == "redis_max_master" else None
                    b = derived[field]
                else:
                    a, b = other.get(field), window.get(field)
                digits = 3 if field.startswith("redis") else 2
                cells = [fmt(a, digits), fmt(b, digits), ratio(b, a)]
                lines.append([label, f"{name} ({better})", *cells])
            reference = other.get("redis_cpu") if other else None
            if key in single:
                for node in cast("list[dict[str, object]]", single[key].get("redis_nodes") or []):
                    idle_single = cast("list[float]", single[key].get("redis_idle_cpu_each") or [])
                    node_lines.append(
                        [
                            label,
                            "one redis-server",
                            str(node.get("port", "")),
                            fmt(16384),
                            "all",
                            fmt(reference, 3),
                            fmt(idle_single[0] if idle_single else None, 3),
                            "1.00",
                            *counted(node),
                        ]
                    )
            rests: list[float | None] = [*idle] if idle else [None] * len(each)
            for node, cpu, rest in zip(nodes, each, rests, strict=False):
                node_lines.append(
                    [
                        label,
                        str(node["label"]),
                        str(node.get("port", "")),
                        fmt(node.get("slots")),
                        fmt(node.get("rooms")) if node["role"] == "master" else "—",
                        fmt(cpu, 3),
                        fmt(rest, 3),
                        ratio(cpu, reference),
                        *counted(node),
                    ]
                )
            if isinstance(reference, (int, float)) and reference and masters:
                worst = max(masters) / reference
                lost = window.get("lost")
                verdicts.append(
                    f"{label}: busiest master {max(masters):.3f} s/s = {worst:.2f} × one "  # noqa: RUF001
                    f"redis-server's {reference:.3f} (target ≤ 0.40: "
                    f"{'met' if worst <= 0.4 else 'NOT met'}), lost {fmt(lost)} on the cluster, "
                    f"{fmt(other.get('lost'))} on one redis-server"
                )
    out.append("\n".join("| " + " | ".join(cells) + " |" for cells in lines))
    out.append(
        "\nRedis CPU per cluster node over each measured window (idle: the 3 s before the load "
        f"generator started, instances connected; one redis-server runs at hz 10, the cluster's "
        f"nodes at hz {CLUSTER_OPTIONS['hz']} with cluster-bus gossip, "
        f"{CLUSTER_OPTIONS['replicas_per_master']} replica(s) per master):\n"
    )
    out.append("\n".join("| " + " | ".join(cells) + " |" for cells in node_lines))
    if verdicts:
        out.append("")
        out.extend(f"- {line}" for line in verdicts)
    return "\n".join(out)


def conditions(results: dict[str, dict[str, dict[str, object]]]) -> str:
    """Per measured window: what else used the machine, and how the generator kept up."""
    header = [
        "window",
        "system",
        "servers CPU s/s (each)",
        "Redis CPU s/s",
        "loadgen CPU s/s",
        "other processes CPU s/s",
        "loadgen loop delay p99/max ms",
        "lost → arrived ≤late s after drain",
        "waited for quiet s",
        "disturbed attempts discarded (other CPU)",
    ]
    rows = []
    keys = sorted({k for r in results.values() for k in r})
    for workload in keys:
        for system in SYSTEMS:
            result = results.get(system, {}).get(workload)
            if not result:
                continue
            parts = result.get("steps") or [result]
            for part in parts:  # type: ignore[union-attr]
                if workload == "A":
                    where = f"A {part['rate']}/s"
                elif workload.startswith("B"):
                    where = f"B {part['rooms']} rooms, {part['member_rate']}/s each"
                elif workload == "D":
                    where = "D opening + joining"
                else:
                    where = "C opening"
                quiet = part.get("quiet") or {}
                if workload.startswith("C"):
                    cpu = [
                        fmt(part.get("open_server_cpu")),
                        fmt(part.get("open_redis_cpu")),
                        fmt(part.get("open_loadgen_cpu")),
                        fmt(part.get("open_other_cpu")),
                    ]
                    delay = "—"
                    late = "—"
                else:
                    values = part.get("server_cpu_each", [])
                    tags = cast("list[str]", result.get("server_labels") or [])
                    if any(tags):  # a supervisor and its workers: say which is which
                        pairs = zip(tags, values, strict=False)
                        each = " / ".join(f"{t} {fmt(v)}" for t, v in pairs)
                    else:
                        each = "/".join(fmt(v) for v in values)
                    cpu = [
                        f"{fmt(part.get('server_cpu'))} ({each})",
                        fmt(part.get("redis_cpu")),
                        fmt(part.get("loadgen_cpu")),
                        fmt(part.get("other_cpu")),
                    ]
                    delay = (
                        f"{fmt(part.get('loadgen_loop_delay_p99_ms'))}/"
                        f"{fmt(part.get('loadgen_loop_delay_max_ms'))}"
                    )
                    late = (
                        f"{fmt(part.get('lost'))} → {fmt(part.get('arrived_late'))}"
                        if part.get("lost")
                        else "0"
                    )
                waited = fmt(quiet.get("waited_s"))
                if quiet.get("quiet") is False:
                    waited += " (not quiet)"
                discarded = (
                    ", ".join(fmt(a.get("other_cpu")) for a in part.get("disturbed_attempts", []))
                    or "—"
                )
                rows.append([where, system_label(system), *cpu, delay, late, waited, discarded])
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def problems(results: dict[str, dict[str, dict[str, object]]]) -> list[str]:
    """Closes, errors and connect failures the generator saw, and server log warnings."""
    out: list[str] = []
    for system, by_workload in results.items():
        for workload, result in by_workload.items():
            parts = result.get("steps") or [result]
            for part in parts:  # type: ignore[union-attr]
                where = f"{system_label(system)} {workload}" + (
                    f" @{part['rate']}/s" if "rate" in part else ""
                )
                for field in ("closes", "errors", "connect_failures", "join_failures"):
                    if part.get(field):
                        out.append(f"{where}: {field} {json.dumps(part[field])}")
                if part.get("stale"):
                    out.append(f"{where}: {part['stale']} stale messages (older step)")
                if part.get("reordered"):
                    out.append(f"{where}: {part['reordered']} out-of-order deliveries")
            for note in result.get("log_notes", []):  # type: ignore[union-attr]
                out.append(f"{system_label(system)} {workload} log: {note}")
    return out


def spread(results: dict[str, dict[str, dict[str, object]]]) -> list[str]:
    """How the connections fell on trio-chat's instances (with workers: how the kernel spread
    them), and in C each process's RSS growth."""
    out: list[str] = []
    for workload, result in results.get("trio", {}).items():
        counts = cast("dict[str, int]", result.get("connections_by_instance") or {})
        total = sum(counts.values())
        line = ", ".join(
            f"{instance} {fmt(n)} ({100 * n / total:.1f}%)" for instance, n in counts.items()
        )
        if workload.startswith("C"):
            before = cast("list[int]", result.get("rss_before_kib") or [])
            after = cast("list[int]", result.get("rss_after_kib") or [])
            tags = cast("list[str]", result.get("server_labels") or [])
            growth = " / ".join(
                f"{t + ' ' if t else ''}{fmt((a - b) / 1024, 1)}"
                for t, b, a in zip(tags, before, after, strict=False)
            )
            line += f"; RSS growth MiB {growth}"
        out.append(f"{system_label('trio')} {workload}: {line or 'none logged'}")
    return out


def versions() -> str:
    def output(command: list[str], cwd: Path = ROOT) -> str:
        try:
            return subprocess.run(
                command, capture_output=True, text=True, cwd=cwd, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    trio = output(
        [
            str(TRIO_PYTHON),
            "-c",
            "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
            "('trio', 'trio-websocket', 'coredis')))",
        ]
    )
    sio = output(
        [
            str(BENCH_PYTHON),
            "-c",
            "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
            "('python-socketio', 'python-engineio', 'uvicorn', 'websockets', 'redis')))",
        ]
    )
    node = output(
        [
            "node",
            "-e",
            "console.log(process.version + ' ws ' + "
            "require('./node_modules/ws/package.json').version + ' socket.io-client ' + "
            "require('./node_modules/socket.io-client/package.json').version)",
        ],
        LOADGEN,
    )
    node_peer = output(
        [
            "node",
            "-e",
            "const v = (p) => require('./node_modules/' + p + '/package.json').version; "
            "console.log(['socket.io', 'engine.io', 'ws', '@socket.io/redis-adapter', 'redis', "
            "'@redis/client', 'jsonwebtoken'].map((p) => p + ' ' + v(p)).join(' '))",
        ],
        NODE_PEER,
    )
    redis = output(["redis-server", "--version"]).split(" ")[2:3]
    commit = output(["git", "rev-parse", "--short", "HEAD"])
    return (
        f"nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, "
        f"{platform.platform()}; trio-chat {SOURCE_NOTE[0] or commit} ({trio}); {sio}; "
        f"Node.js Socket.IO peer ({node_peer}); "
        f"redis-server "
        f"{''.join(redis).removeprefix('v=')}; node {node}"
    )


def print_report(
    args: argparse.Namespace,
    *,
    systems: list[str],
    redis_modes: list[str],
    results: dict[str, dict[str, dict[str, object]]],
    cluster_results: dict[str, dict[str, dict[str, object]]],
    profile: tuple[dict[str, object] | None, str | None],
    handshakes: tuple[dict[str, object] | None, str | None],
    connect: tuple[dict[str, object] | None, str | None],
    failed: list[str],
    started: float,
    logs: Path,
) -> None:
    """Print the run's tables and notes on stdout; with --json, write every result to a file."""
    quick = args.quick
    profile_result, profile_text = profile
    handshake_result, handshake_text = handshakes
    connect_result, connect_text = connect
    elapsed = time.monotonic() - started
    date = datetime.date.today().isoformat()
    mode = "quick" if quick else "full"
    print(f"\n{date}, {mode} run ({' '.join(sys.argv[1:]) or 'defaults'}), {elapsed:.0f} s wall")
    print(versions())
    if "trio" in systems:
        history = (
            "history.size 200 (the server's default)"
            if args.history_size is None
            else f"history.size {args.history_size}"
            + (" (history off: a send is a bare PUBLISH)" if args.history_size == 0 else "")
        )
        print(f"{system_label('trio')}: {LAYOUT_NOTES[args.trio_layout]}; {history}")
    passes = []
    if any(results.values()):
        passes.append(("single", results))
    if cluster_results["trio"]:
        passes.append(("cluster", cluster_results))
    for redis, by_system in passes:
        LABEL_REDIS[0] = "" if redis == "single" else ", Redis Cluster"
        if len(redis_modes) > 1 or redis != "single":
            print(f"\n### On {REDIS_LABELS[redis]}")
        print()
        print(table(by_system, args.p99_limit))
        print("\nConditions of each measured window (CPU in cores: CPU seconds per second):\n")
        print(conditions(by_system))
        if "trio" in systems and TRIO_LAYOUTS[args.trio_layout][1] > 1:
            print("\n(servers CPU each: sup = trio-chat's supervisor, w<n> = its worker n)")
        shares = spread(by_system)
        if shares:
            print("\nConnections accepted per trio-chat instance (its `connected` log lines):")
            for line in shares:
                print(f"- {line}")
        notes = problems(by_system)
        if notes:
            print("\nSeen during the run:")
            for note in notes:
                print(f"- {note}")
    LABEL_REDIS[0] = ""
    if cluster_results["trio"]:
        print(f"\n### {system_label('trio')}: {REDIS_LABELS['single']} vs the cluster")
        print()
        print(redis_comparison(results.get("trio", {}), cluster_results["trio"]))
    if profile_text:
        print(f"\nProfile written to {args.profile_out}-*:\n")
        print(profile_text)
    if handshake_text:
        print(f"\nHandshake profile written to {args.profile_handshakes_out}-*:\n")
        print(handshake_text)
    if connect_text:
        print(f"\nConnect profile written to {args.profile_connect_out}-*:\n")
        print(connect_text)
    print(f"\nServer logs: {logs}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "results": results,
                    "cluster_results": cluster_results,
                    "redis": args.redis,
                    "cluster_options": CLUSTER_OPTIONS,
                    "profile": profile_result,
                    "profile_handshakes": handshake_result,
                    "profile_connect": connect_result,
                    "failed": failed,
                    "versions": versions(),
                    "date": date,
                    "quick": quick,
                    "trio_layout": args.trio_layout,
                    "history_size": args.history_size,
                },
                indent=1,
            )
        )
