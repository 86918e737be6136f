"""Failover time on a Redis Cluster (SPEC §12): a master dies; how long until a message sent
after that reaches the other instance's client again, on the same sockets?

Starts a Redis Cluster (tests/_redis_cluster.py: 3 masters + 3 replicas of ``redis-server`` on
free ports of 127.0.0.1, ``cluster-node-timeout`` 1 s) and two ``trio-chat serve`` instances on
it, the way ``run.py`` starts them (from a copy of ``trio_chat/``, with
``TRIO_CHAT_REDIS_COMMAND_TIMEOUT`` = ``--command-timeout``), then:

1. "sender" on instance 1 and "receiver" on instance 2 join room ``failover``; the sender
   writes a ``send`` every ``--interval`` s (pipelined: it does not wait for the ack), and a
   reader task matches each ``ack`` or ``error`` to its ``ref``;
2. each round, once messages flow (the last acked ones have arrived), SIGKILL the master that
   owns the slot of ``chat:room:failover`` (``master_for_key``), and time from the kill:
   **promotion** (``wait_for_failover``: its replica owns the slots on every other node, with
   cluster_state:ok), the sender's first ``ack`` of a send written after the kill, and the
   **first delivery** on the receiver of a message sent after the kill;
3. ``--linger`` s after that first delivery the killed node is started again (empty; it comes
   back as a replica of its replacement) and the cluster must be ok everywhere before the next
   round, whose kill then hits the new master. With ``--fresh``, every round gets a new
   cluster, new instances and new clients instead.

The sockets are never reopened: a client whose connection closes fails the run, and each
instance's log must show exactly one ``connected`` line per client. At the end the sender
stops, the last answers are read, and every acked message must have reached the receiver
(live, or handed out by the instance's catch-up from the room's stream after its Pub/Sub
connection came back): **acked-but-lost** counts those that did not, by whether they were
acked before the kill (a write the master acknowledged but had not replicated yet is lost with
it: Redis replication is asynchronous) or after it (never expected). Also counted: ``error
unavailable`` answers (expected during the failover), sends with no answer, messages delivered
although their send was answered with an error, duplicates and out-of-order deliveries.

Run: .venv/bin/python bench/failover.py [--rounds 5] [--interval 0.02] [--fresh] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import run  # bench/run.py: the process helpers
import trio
from trio_websocket import ConnectionClosed

from trio_chat.client import ChatClient, open_client

ROOM = "failover"
ROOM_KEY = f"chat:room:{ROOM}"
#: a round fails when the first delivery after the kill takes longer than this
ROUND_TIMEOUT = 30.0


class Traffic:
    """What the sender sent and was answered, and what the receiver read, with times
    (time.monotonic()) and the round each send was written in."""

    def __init__(self) -> None:
        self.sent: dict[int, dict[str, Any]] = {}  # ref -> t, round, after_kill, ack/error
        self.received: list[tuple[float, int, str]] = []  # (time read, n, id)
        self.closed: dict[str, str] = {}  # client -> why its connection ended
        self.round = 0
        self.kill_at: float | None = None  # of the current round
        self.sending = True
        self.other_frames: dict[str, int] = {}
        self.new_delivery = trio.Event()

    def expect_other(self, who: str, frame: dict[str, Any]) -> None:
        kind = f"{who}:{frame.get('type')}"
        self.other_frames[kind] = self.other_frames.get(kind, 0) + 1


async def send_loop(chat: ChatClient, traffic: Traffic, interval: float) -> None:
    ref = 0
    next_at = time.monotonic()
    while traffic.sending:
        ref += 1
        now = time.monotonic()
        traffic.sent[ref] = {
            "t": now,
            "round": traffic.round,
            "after_kill": traffic.kill_at is not None,
        }
        frame = {"type": "send", "ref": ref, "room": ROOM, "data": {"n": ref}}
        try:
            await chat.send_frame(frame)
        except ConnectionClosed as exc:
            traffic.closed.setdefault("sender", f"while sending: {exc!r}")
            return
        next_at += interval
        await trio.sleep(max(0.0, next_at - time.monotonic()))


async def sender_reader(chat: ChatClient, traffic: Traffic) -> None:
    try:
        while True:
            frame = await chat.receive()
            now = time.monotonic()
            kind = frame.get("type")
            record = traffic.sent.get(frame.get("ref"))  # type: ignore[arg-type]
            if kind == "ack" and record is not None:
                record["ack"] = frame["id"]
                record["answered"] = now
            elif kind == "error" and record is not None:
                record["error"] = frame.get("code")
                record["answered"] = now
            else:
                traffic.expect_other("sender", frame)
    except ConnectionClosed as exc:
        traffic.closed.setdefault("sender", repr(exc))


async def receiver_reader(chat: ChatClient, traffic: Traffic) -> None:
    try:
        while True:
            frame = await chat.receive()
            now = time.monotonic()
            if frame.get("type") == "message" and frame.get("room") == ROOM:
                traffic.received.append((now, int(frame["data"]["n"]), frame["id"]))
                traffic.new_delivery.set()
                traffic.new_delivery = trio.Event()
            else:
                traffic.expect_other("receiver", frame)
    except ConnectionClosed as exc:
        traffic.closed.setdefault("receiver", repr(exc))


def check_open(traffic: Traffic) -> None:
    if traffic.closed:
        raise run.BenchError(
            f"a client's connection ended (no reconnect allowed): {traffic.closed}"
        )


async def wait_flowing(traffic: Traffic) -> float:
    """Until the 10 newest acked sends (of this round, acked 0.2 s ago or more) have all
    arrived at the receiver; returns how long that took."""
    start = time.monotonic()
    with trio.fail_after(20.0):
        while True:
            check_open(traffic)
            await trio.sleep(0.1)
            now = time.monotonic()
            acked = [
                r
                for r, s in traffic.sent.items()
                if "ack" in s and s["round"] == traffic.round and now - s["answered"] > 0.2
            ]
            newest = sorted(acked)[-10:]
            got = {n for _, n, _ in traffic.received}
            if len(newest) == 10 and all(r in got for r in newest):
                return time.monotonic() - start


async def one_round(
    cluster: Any, traffic: Traffic, number: int, args: argparse.Namespace, restart: bool
) -> dict[str, Any]:
    traffic.round = number
    traffic.kill_at = None
    steady = await wait_flowing(traffic)
    port = await trio.to_thread.run_sync(cluster.master_for_key, ROOM_KEY)
    replicas = list(cluster.shards.get(port, ()))
    seen_before = len(traffic.received)
    kill_at = time.monotonic()
    cluster.kill(port)  # SIGKILL and reap: a few ms
    traffic.kill_at = kill_at
    result: dict[str, Any] = {
        "round": number,
        "killed": port,
        "replicas": replicas,
        "kill_at": kill_at,
    }
    promoted: dict[str, Any] = {}

    async def promotion() -> None:
        try:
            new = await trio.to_thread.run_sync(cluster.wait_for_failover, port, ROUND_TIMEOUT)
            promoted["at"] = time.monotonic()
            promoted["port"] = new
        except TimeoutError as exc:
            promoted["error"] = str(exc)

    first: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(promotion)
        with trio.move_on_after(ROUND_TIMEOUT):
            while not first:
                check_open(traffic)
                for t, n, message_id in traffic.received[seen_before:]:
                    if traffic.sent[n]["t"] > kill_at:
                        first = {"at": t, "n": n, "id": message_id}
                        break
                else:
                    seen_before = len(traffic.received)
                    with trio.move_on_after(0.05):
                        await traffic.new_delivery.wait()
    if not first:
        raise run.BenchError(f"round {number}: nothing sent after the kill arrived in 30 s")
    if "error" in promoted:
        raise run.BenchError(f"round {number}: {promoted['error']}")
    # keep the traffic going, then look at what happened from the kill on
    await trio.sleep(args.linger)
    check_open(traffic)
    in_round = [s for s in traffic.sent.values() if s["round"] == number and s["after_kill"]]
    acked_after = [s["answered"] for s in in_round if "ack" in s]
    errors: dict[str, int] = {}
    for s in in_round:
        if "error" in s:
            errors[s["error"]] = errors.get(s["error"], 0) + 1
    last_error = max((s["answered"] for s in in_round if "error" in s), default=None)
    first_n_sent = traffic.sent[first["n"]]["t"]
    # every send of the round from the kill on: (sent, answered) relative to the kill, and how
    # it was answered; and the answer latencies (send written -> ack or error read)
    window = [
        [
            round(s["t"] - kill_at, 3),
            round(s["answered"] - kill_at, 3) if "answered" in s else None,
            "ack" if "ack" in s else s.get("error"),
        ]
        for s in in_round
    ]
    waits = [s["answered"] - s["t"] for s in in_round if "answered" in s]
    arrivals = [t for t, _, _ in traffic.received if t > kill_at - 1.0]
    result |= {
        "steady_wait_s": round(steady, 2),
        "new_master": promoted["port"],
        "promotion_s": round(promoted["at"] - kill_at, 3),
        "first_ack_after_kill_s": round(min(acked_after) - kill_at, 3) if acked_after else None,
        "first_delivery_s": round(first["at"] - kill_at, 3),
        "first_delivered_sent_s": round(first_n_sent - kill_at, 3),
        "delivery_after_promotion_s": round(first["at"] - promoted["at"], 3),
        "last_error_s": round(last_error - kill_at, 3) if last_error else None,
        "sends_after_kill": len(in_round),
        "errors_after_kill": errors,
        "answer_wait_max_s": round(max(waits), 3) if waits else None,
        "answer_wait_median_s": round(statistics.median(waits), 3) if waits else None,
        "sends": window,
        "longest_delivery_gap_s": round(
            max((b - a for a, b in itertools.pairwise(arrivals)), default=0.0), 3
        ),
    }
    print(
        f"round {number}: killed :{port}, promoted :{result['new_master']} after "
        f"{result['promotion_s']} s; first ack after the kill {result['first_ack_after_kill_s']}"
        f" s, first delivery {result['first_delivery_s']} s (sent at +"
        f"{result['first_delivered_sent_s']} s); errors {errors}",
        file=sys.stderr,
    )
    if restart:
        t0 = time.monotonic()
        await trio.to_thread.run_sync(cluster.restart, port)
        await trio.to_thread.run_sync(cluster.wait_ok, 30.0)
        result["restart_and_ok_s"] = round(time.monotonic() - t0, 2)
    return result


async def drive(
    urls: list[str], cluster: Any, args: argparse.Namespace, rounds: list[int], restart: bool
) -> dict[str, Any]:
    """The two clients, the traffic and ``rounds`` rounds on one cluster."""
    traffic = Traffic()
    results = []
    async with (
        open_client(urls[0], run.token("sender")) as sender,
        open_client(urls[1], run.token("receiver")) as receiver,
    ):
        await sender.join(ROOM)
        await receiver.join(ROOM)
        sessions = (sender.welcome.get("session"), receiver.welcome.get("session"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender_reader, sender, traffic)
            nursery.start_soon(receiver_reader, receiver, traffic)
            nursery.start_soon(send_loop, sender, traffic, args.interval)
            try:
                for number in rounds:
                    last = number == rounds[-1]
                    results.append(
                        await one_round(cluster, traffic, number, args, restart and not last)
                    )
                # the end: no more sends; the last answers, then what is still on its way
                traffic.sending = False
                with trio.move_on_after(3 * args.command_timeout + 2):
                    while any("answered" not in s for s in traffic.sent.values()):  # noqa: ASYNC110
                        await trio.sleep(0.05)
                await trio.sleep(args.drain)
                check_open(traffic)
            finally:
                nursery.cancel_scope.cancel()
        still_open = sender.ws.closed is None and receiver.ws.closed is None
    return {
        "rounds": results,
        "traffic": traffic,
        "sessions": sessions,
        "still_open_at_end": still_open,
    }


def account(traffic: Traffic, kills: dict[int, float]) -> dict[str, Any]:
    """Acked-but-lost and the rest, over one session's traffic (``kills``: round -> kill time)."""
    got: dict[int, int] = {}
    order_violations = 0
    last_id: tuple[int, int] | None = None
    for _, n, message_id in traffic.received:
        got[n] = got.get(n, 0) + 1
        ms, _, seq = message_id.partition("-")
        key = (int(ms), int(seq or 0))
        if last_id is not None and key <= last_id:
            order_violations += 1
        last_id = key
    lost = []
    for ref, s in traffic.sent.items():
        if "ack" in s and ref not in got:
            kill = kills.get(s["round"])
            lost.append(
                {
                    "n": ref,
                    "id": s["ack"],
                    "round": s["round"],
                    "sent_rel_kill_s": round(s["t"] - kill, 3) if kill else None,
                    "acked_rel_kill_s": round(s["answered"] - kill, 3) if kill else None,
                }
            )
    errors: dict[str, int] = {}
    for s in traffic.sent.values():
        if "error" in s:
            errors[s["error"]] = errors.get(s["error"], 0) + 1
    delivered_after_error = [
        {"n": ref, "error": s["error"], "round": s["round"]}
        for ref, s in traffic.sent.items()
        if "error" in s and ref in got
    ]
    return {
        "sent": len(traffic.sent),
        "acked": sum("ack" in s for s in traffic.sent.values()),
        "errors": errors,
        "unanswered": sum("answered" not in s for s in traffic.sent.values()),
        "delivered": len(got),
        "duplicates": sum(c - 1 for c in got.values()),
        "order_violations": order_violations,
        "acked_but_lost": len(lost),
        "acked_but_lost_before_kill": sum(1 for x in lost if (x["acked_rel_kill_s"] or -1) < 0),
        "acked_but_lost_after_kill": sum(1 for x in lost if (x["acked_rel_kill_s"] or -1) >= 0),
        "lost_samples": lost[:20],
        "delivered_after_error": len(delivered_after_error),
        "delivered_after_error_samples": delivered_after_error[:10],
        "other_frames": traffic.other_frames,
    }


def session(
    args: argparse.Namespace, logs: Path, rounds: list[int], restart: bool
) -> dict[str, Any]:
    """One cluster, two instances, two clients, ``rounds``."""
    workdir = Path(tempfile.mkdtemp(prefix=f"round-{rounds[0]}-", dir=logs))
    with contextlib.ExitStack() as stack:
        url, nodes, cluster = stack.enter_context(run.redis_cluster(workdir))
        urls = [
            stack.enter_context(run.trio_chat_server(workdir, url, f"trio-{i}"))[0] for i in (1, 2)
        ]
        out = trio.run(drive, urls, cluster, args, rounds, restart)
    out["connections_by_instance"] = run.connections_by_instance(workdir)
    out["log_notes"] = run.log_notes(workdir)
    out["workdir"] = str(workdir)
    out["cluster_nodes"] = nodes
    out["node_timeout_s"] = cluster.node_timeout
    return out


def stats(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):.2f} / {max(values):.2f} / {min(values):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="failovers (5)")
    parser.add_argument("--interval", type=float, default=0.02, help="s between sends (0.02)")
    parser.add_argument(
        "--command-timeout",
        type=float,
        default=0.5,
        help="TRIO_CHAT_REDIS_COMMAND_TIMEOUT of the instances (0.5)",
    )
    parser.add_argument(
        "--linger", type=float, default=2.0, help="s of traffic after the first delivery (2)"
    )
    parser.add_argument("--drain", type=float, default=2.0, help="s to wait at the end (2)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="a new cluster, new instances and new clients per round (default: restart the "
        "killed node, wait for the cluster to be ok, and kill the room's new master)",
    )
    parser.add_argument(
        "--trio-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the trio-chat instances",
    )
    parser.add_argument("--json", help="also write every result to this file")
    args = parser.parse_args()
    run.TRIO_ENV["TRIO_CHAT_REDIS_COMMAND_TIMEOUT"] = str(args.command_timeout)
    for item in args.trio_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("TRIO_CHAT_"):
            parser.error(f"--trio-env wants TRIO_CHAT_KEY=VALUE, not {item!r}")
        run.TRIO_ENV[key] = value
    logs = Path(tempfile.mkdtemp(prefix="trio-chat-failover-"))
    source = run.snapshot_source(logs)
    print(f"trio-chat under test: {source}; logs in {logs}", file=sys.stderr)
    started = time.monotonic()
    load_before = os.getloadavg()
    sessions: list[dict[str, Any]] = []
    numbers = list(range(1, args.rounds + 1))
    try:
        if args.fresh:
            for number in numbers:
                sessions.append(session(args, logs, [number], restart=False))
        else:
            sessions.append(session(args, logs, numbers, restart=True))
    except run.BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    rounds = [r for s in sessions for r in s["rounds"]]
    node_timeout = sessions[0]["node_timeout_s"]
    totals: dict[str, Any] = {}
    problems: list[str] = []
    for s in sessions:
        kills = {r["round"]: r["kill_at"] for r in s["rounds"]}
        acc = account(s["traffic"], kills)
        for key, value in acc.items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
            elif isinstance(value, dict):
                bucket = totals.setdefault(key, {})
                for k, v in value.items():
                    bucket[k] = bucket.get(k, 0) + v
            else:
                totals.setdefault(key, []).extend(value)
        if (
            set(s["connections_by_instance"].values()) != {1}
            or len(s["connections_by_instance"]) != 2
        ):
            problems.append(
                f"connections per instance {s['connections_by_instance']} (want 1 each)"
            )
        if not s["still_open_at_end"]:
            problems.append("a client's socket was closed at the end")
        s["traffic"] = None
    first = [r["first_delivery_s"] for r in rounds]
    promotion = [r["promotion_s"] for r in rounds]
    after_promotion = [r["delivery_after_promotion_s"] for r in rounds]
    first_ack = [r["first_ack_after_kill_s"] for r in rounds if r["first_ack_after_kill_s"]]
    target = node_timeout + 2.0
    date = datetime.date.today().isoformat()
    mode = "a new cluster per round" if args.fresh else "killed node restarted between rounds"
    print(
        f"\n{date}, {len(rounds)} failovers ({mode}), send every {args.interval * 1000:.0f} ms, "
        f"redis.command_timeout {args.command_timeout} s, cluster-node-timeout "
        f"{node_timeout:g} s, {elapsed:.0f} s wall\n"
    )
    print(
        "| round | killed → new master | promotion s | first ack after kill s | first delivery s "
        "| (its send at +s) | delivery after promotion s | last error s | errors | longest gap s |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rounds:
        print(
            f"| {r['round']} | :{r['killed']} → :{r['new_master']} | {r['promotion_s']:.2f} | "
            f"{r['first_ack_after_kill_s']} | **{r['first_delivery_s']:.2f}** | "
            f"{r['first_delivered_sent_s']:.2f} | {r['delivery_after_promotion_s']:.2f} | "
            f"{r['last_error_s']} | {json.dumps(r['errors_after_kill'])} | "
            f"{r['longest_delivery_gap_s']:.2f} |"
        )
    print(
        f"\nmedian / max / min, s: kill → promoted {stats(promotion)}; kill → first ack "
        f"{stats(first_ack)}; **kill → first delivery {stats(first)}** (target ≤ "
        f"{target:g}: {'met' if first and max(first) <= target else 'NOT met'}); promoted → "
        f"first delivery {stats(after_promotion)}"
    )
    print(
        f"\nsent {totals['sent']}, acked {totals['acked']}, errors {totals['errors']}, "
        f"unanswered {totals['unanswered']}; delivered {totals['delivered']}; **acked but lost "
        f"{totals['acked_but_lost']}** (acked before the kill "
        f"{totals['acked_but_lost_before_kill']}, after {totals['acked_but_lost_after_kill']}); "
        f"delivered although answered with an "
        f"error {totals['delivered_after_error']}; duplicates {totals['duplicates']}, out of "
        f"order {totals['order_violations']}; other frames {totals['other_frames']}"
    )
    if totals["lost_samples"]:
        print(f"lost: {totals['lost_samples'][:10]}")
    for s in sessions:
        print(
            f"connections per instance {s['connections_by_instance']}, sockets open at the end "
            f"{s['still_open_at_end']}, logs {s['workdir']}"
        )
        for note in s["log_notes"]:
            print(f"- {note}")
    load_after = os.getloadavg()
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); nproc "
        f"{len(os.sched_getaffinity(0))}, Python {platform.python_version()}; {source}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "rounds": rounds, "totals": totals, "sessions": sessions},
                indent=1,
                default=str,
            )
        )
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
