"""The workloads: one pass (one system, one workload: Redis and the servers up, the load
generator run, everything down again), and the plans of A-D with their time budgets from
the command line."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable


from .processes import (
    _child_setup,
    cluster_slot,
    idle_cpu,
    redis_cluster,
    redis_counters,
    redis_server,
)
from .profiling import run_profiled, write_profile_summary
from .report import fmt
from .settings import (
    CLUSTER_OPTIONS,
    HISTORY_SIZE,
    IDLE_SAMPLE_S,
    LOADGEN,
    LOADGEN_SYSTEM,
    REDIS_LABELS,
    SECRET,
    TRIO_LAYOUT,
    TRIO_LAYOUTS,
    BenchError,
)
from .systems import (
    connections_by_instance,
    log_notes,
    socketio_node_server,
    socketio_server,
    system_label,
    trio_chat_server,
)


def loadgen_command(
    system: str, workload: str, urls: list[str], options: dict[str, object]
) -> list[str]:
    client = LOADGEN_SYSTEM[system]
    command = ["node", str(LOADGEN / "loadgen.mjs"), "--system", client, "--workload", workload]
    command += ["--urls", ",".join(urls), "--secret", SECRET]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    return command


def run_loadgen(command: list[str], timeout: float, workdir: Path) -> dict[str, object]:
    stdout_path = workdir / "loadgen.out"
    with stdout_path.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, cwd=LOADGEN, preexec_fn=_child_setup)
        try:
            code = process.wait(timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
    text = stdout_path.read_text()
    if code != 0:
        raise BenchError(f"load generator exited {code}; stdout: {text[-2000:]}")
    result: dict[str, object] = json.loads(text.strip().splitlines()[-1])
    return result


def one_pass(
    system: str,
    workload: str,
    options: dict[str, object],
    timeout: float,
    logs: Path,
    profile: dict[str, object] | None = None,
    trigger: bytes = b"SENDING",
    redis: str = "single",
) -> dict[str, object]:
    tag = "" if redis == "single" else f"-{redis}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{system}-{workload}{tag}-", dir=logs))
    print(
        f"\n== {system_label(system)} on {REDIS_LABELS[redis]}: workload {workload} (logs in "
        f"{workdir})",
        file=sys.stderr,
    )
    if workload == "connect":  # D: one instance of every system (1x2: one with two workers)
        processes, workers = 1, TRIO_LAYOUTS[TRIO_LAYOUT[0]][1] if system == "trio" else 1
    elif system == "trio":
        processes, workers = TRIO_LAYOUTS[TRIO_LAYOUT[0]]
    else:
        processes, workers = 2, 1
    cluster: object = None
    with contextlib.ExitStack() as stack:
        if redis == "cluster":
            redis_url, redis_nodes, cluster = stack.enter_context(redis_cluster(workdir))
            redis_pids = [cast("int", node["pid"]) for node in redis_nodes]
        else:
            redis_url, redis_pid = stack.enter_context(redis_server(workdir))
            redis_nodes = [
                {
                    "label": "redis-server",
                    "role": "single",
                    "pid": redis_pid,
                    "port": int(redis_url.rsplit(":", 1)[1].split("/")[0]),
                }
            ]
            redis_pids = [redis_pid]
        servers = []
        for i in range(1, processes + 1):
            name = f"{system}-{i}"
            if system == "trio":
                server = trio_chat_server(workdir, redis_url, name, workers)
            elif system == "socketio-node":
                server = socketio_node_server(workdir, redis_url, name)
            else:
                server = socketio_server(workdir, redis_url, name)
            servers.append(stack.enter_context(server))
        # one process: the same URL twice, and the kernel spreads the clients over its workers
        urls = [url for url, _ in servers] * (2 // processes)
        pids = [pid for _, group in servers for pid in group]
        # what serves connections (py-spy's targets): not a supervisor
        serving = [pid for _, group in servers for pid in (group[1:] if workers > 1 else group)]
        options = {
            **options,
            "pids": ",".join(map(str, pids)),
            "redis-pid": ",".join(map(str, redis_pids)),
        }
        # the Redis processes' own cost with the instances connected and idle (a cluster's
        # nodes run at --cluster-hz and gossip on the cluster bus; one redis-server at hz 10)
        redis_idle = idle_cpu(redis_pids, IDLE_SAMPLE_S)
        counters_before = [redis_counters(cast("int", n["port"])) for n in redis_nodes]
        command = loadgen_command(system, workload, urls, options)
        if profile is None:
            result = run_loadgen(command, timeout, workdir)
        else:
            result = run_profiled(command, timeout, workdir, serving, profile, trigger)
        # Redis's own counters over the whole load generator run (connecting, joining and the
        # measured window): how many commands came per read, i.e. how well they were batched
        for node, before in zip(redis_nodes, counters_before, strict=True):
            after = redis_counters(cast("int", node["port"]))
            node["counters"] = {k: after[k] - before.get(k, 0) for k in after}
    result["log_notes"] = log_notes(workdir)
    result["logs"] = str(workdir)
    result["redis"] = redis
    if redis == "cluster":
        result["cluster_options"] = dict(CLUSTER_OPTIONS)
    result["redis_nodes"] = redis_nodes  # the order of redis_cpu_each and redis_idle_cpu_each
    result["redis_idle_cpu_each"] = redis_idle
    if redis == "cluster" and workload == "rooms":
        # where B's rooms live: rooms (stream + shard channel chat:room:<room>) per master
        owners = cluster.slot_owner  # type: ignore[attr-defined]
        per_master: Counter[int] = Counter(
            owners[cluster_slot(f"chat:room:room-{i}")]
            for i in range(int(options["rooms"]))  # type: ignore[call-overload]
        )
        for node in redis_nodes:
            if node["role"] == "master":
                node["rooms"] = per_master[cast("int", node["port"])]
    # the order of the generator's server_cpu_each and rss_*_kib lists
    result["server_pids"] = pids
    result["server_labels"] = (
        [tag for _ in servers for tag in ("sup", *(f"w{n}" for n in range(workers)))]
        if workers > 1
        else [""] * len(pids)
    )
    if system == "trio":
        result["trio_layout"] = f"1x{workers}" if workload == "connect" else TRIO_LAYOUT[0]
        result["history_size"] = HISTORY_SIZE[0]
        result["connections_by_instance"] = connections_by_instance(workdir)
    return result


#: B's member rates climbed by --b-peak (msg/s per member)
B_PEAK_RATES = "0.5,1,2,4,8"


def b_key(rooms: int, member_rate: float) -> str:
    """The plan key of one B pass: ``B<rooms>@<member rate>``."""
    return f"B{rooms}@{member_rate:g}"


def b_passed(result: dict[str, object], p99_limit: float) -> bool:
    """A B pass within the peak's limits: nothing lost, p99 under ``p99_limit``."""
    p99 = result.get("p99_ms")
    return result.get("lost") == 0 and isinstance(p99, (int, float)) and p99 < p99_limit


def plan(
    args: argparse.Namespace,
) -> tuple[dict[str, tuple[str, dict[str, object]]], dict[str, float], dict[str, object]]:
    """The passes the command line asks for: workload key (A, B@<member rate>, C, D) ->
    (the generator's workload, its options); the time budget of one pass of each workload;
    and the options every pass shares."""
    quick = args.quick
    rates = args.rates or ("50,100,200,400" if quick else "50,100,200,400,800,1600")
    duration = args.duration or (3.0 if quick else 10.0)
    rooms = args.rooms or (200 if quick else 500)
    room_duration = args.room_duration or (5.0 if quick else 10.0)
    connections = args.connections or (1000 if quick else 5000)
    common = {
        "concurrency": args.concurrency,
        "quiet-max": args.quiet_max,
        "late": args.late,
        "retries": args.retries,
    }
    plans = {
        "A": (
            "fanout",
            {
                **common,
                "rates": rates,
                "duration": duration,
                "drain": args.drain,
                "subscribers": args.subscribers,
            },
        ),
        "C": ("idle", {**common, "connections": connections}),
        "D": (
            "connect",
            {
                **common,
                "connections": args.connect_connections,
                "concurrency": args.connect_concurrency,
            },
        ),
    }
    counts = str(rooms).split(",")
    passes = [(count, rate) for count in counts for rate in str(args.member_rate).split(",")]
    if args.b_peak:  # the climb, at the first room count
        passes += [(counts[0], rate) for rate in B_PEAK_RATES.split(",")]
    for count, member_rate in passes:
        plans.setdefault(
            b_key(int(count), float(member_rate)),
            (
                "rooms",
                {
                    **common,
                    "rooms": count,
                    "members": args.members,
                    "member-rate": member_rate,
                    "duration": room_duration,
                    "drain": args.drain,
                    **({"rooms-traffic": "both"} if args.rooms_traffic else {}),
                },
            ),
        )
    n_rates = len(rates.split(","))
    budgets = {
        "A": n_rates
        * (1 + args.retries)
        * (duration + args.drain + args.late + args.quiet_max + 60)
        + 60,
        "B": (1 + args.retries) * (room_duration + args.drain + args.late + args.quiet_max) + 240,
        "C": connections / 20 + args.quiet_max + 240,
        "D": args.connect_connections / 20 + args.quiet_max + 240,
    }
    return plans, budgets, common


# --- the extra profiled passes (--profile, --profile-handshakes, --profile-connect) ----------


def profile_fanout(
    args: argparse.Namespace, common: dict[str, object], logs: Path, failed: list[str]
) -> tuple[dict[str, object] | None, str | None]:
    """--profile: one more trio-chat fan-out pass, at RATE msg/s, under py-spy; its result and
    summary (None, None when it failed, which ``failed`` then says)."""
    profile_rate = args.profile
    seconds = args.profile_seconds
    options = {
        **common,
        "rates": profile_rate,
        "duration": 2 * seconds + 4,
        "drain": args.drain,
        "subscribers": args.subscribers,
    }
    try:
        result = one_pass(
            "trio",
            "fanout",
            options,
            4 * seconds + args.quiet_max + 120,
            logs,
            profile={"seconds": seconds, "out": args.profile_out},
        )
        step = result["steps"][0]  # type: ignore[index]
        text = write_profile_summary(
            result,
            args.profile_out,
            f"{system_label('trio')} fan-out at {profile_rate} msg/s to {args.subscribers} "
            f"subscribers while profiled: delivered {step['received']}/{step['expected']}, p50 "
            f"{step['p50_ms']} ms, p99 {step['p99_ms']} ms, server CPU {step['server_cpu']} "
            f"s/s (each {step['server_cpu_each']}), Redis {step['redis_cpu']}",
        )
    except BenchError as exc:
        failed.append(f"profile: {exc}")
        print(f"FAILED: profile: {exc}", file=sys.stderr)
        return None, None
    return result, text


def profiled(
    args: argparse.Namespace,
    logs: Path,
    failed: list[str],
    name: str,
    workload: str,
    options: dict[str, object],
    profile: dict[str, object],
    trigger: bytes,
    describe: Callable[[dict[str, object]], str],
) -> tuple[dict[str, object] | None, str | None]:
    """One more trio-chat pass of ``workload`` under py-spy; its result and summary."""
    n = cast("int", options["connections"])
    try:
        result = one_pass(
            "trio",
            workload,
            options,
            n / 20 + args.quiet_max + 240,
            logs,
            profile=profile,
            trigger=trigger,
        )
        return result, write_profile_summary(result, str(profile["out"]), describe(result))
    except BenchError as exc:
        failed.append(f"{name}: {exc}")
        print(f"FAILED: {name}: {exc}", file=sys.stderr)
        return None, None


def describe_handshakes(args: argparse.Namespace, c: dict[str, object]) -> str:
    """What the --profile-handshakes pass did, above its summary."""
    latency = cast("dict[str, object]", c["open_latency"])
    return (
        f"{system_label('trio')} C: opening {c['connections']:,} idle connections, "
        f"{args.concurrency} in flight, while profiled: opened {c['connected']}/"
        f"{c['connections']} in {c['open_s']} s, {fmt(c['opened_per_s'])}/s (open p50 "
        f"{latency['p50_ms']} ms, p99 {latency['p99_ms']} ms), server CPU "
        f"{c['open_server_cpu']} s/s, Redis {c['open_redis_cpu']}, other processes "
        f"{c['open_other_cpu']}; py-spy ran {c.get('profiled_s')} s from its start (stopped "
        f"{c.get('profile_stopped_at')})"
    )


def describe_connects(args: argparse.Namespace, d: dict[str, object]) -> str:
    """What the --profile-connect pass did, above its summary."""
    opens = cast("dict[str, object]", d["open_latency"])
    joins = cast("dict[str, object]", d["join_latency"])
    return (
        f"trio-chat (one instance) D: {d['connections']:,} connections opened and each "
        f"joined to a new room, {args.connect_concurrency} in flight, while profiled: "
        f"{d['joined']} joined in {d['total_s']} s, {fmt(d['opened_joined_per_s'])}/s (open "
        f"p50 {opens['p50_ms']} ms, join p50 {joins['p50_ms']} ms), server CPU "
        f"{d['server_cpu']} s/s, Redis {d['redis_cpu']}; py-spy ran {d.get('profiled_s')} s,"
        f" stopped {d.get('profile_stopped_at')}"
    )
