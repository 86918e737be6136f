"""The soak's report: the JSON object it prints last (the invariant's counts first, then how
the run went), and the scan of the instances' logs for tracebacks."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from .common import format_id

if TYPE_CHECKING:
    from pathlib import Path

    from .runner import Soak


def scan_logs(workdir: Path) -> tuple[int, list[str]]:
    """Tracebacks in the instances' logs: lines with a Python traceback or a logged exc_info."""
    count, samples = 0, []
    for log in sorted(workdir.glob("soak-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "Traceback" in line or '"exc_info"' in line:
                count += 1
                if len(samples) < 5:
                    try:
                        record = json.loads(line)
                        text = f"{record.get('message')} | {str(record.get('exc_info', ''))[-300:]}"
                    except ValueError:
                        text = line[:300]
                    samples.append(f"{log.name}: {text}")
    return count, samples


def build_report(
    soak: Soak, result: dict[str, Any], error: str | None, wall: float
) -> dict[str, Any]:
    audit = soak.ledger.audit(keep_lost=50)
    tracebacks, traceback_samples = scan_logs(soak.workdir)
    leaks = result.get("leaks", {})
    presence = result.get("presence", {})
    rooms_end = result.get("rooms_end", {})
    lost_samples = []
    for room, message_id, index in audit.pop("lost_list"):
        client = soak.clients[index]
        message = soak.ledger.messages[(room, message_id)]
        lost_samples.append(
            {
                "room": room,
                "id": format_id(message_id),
                "to_client": index,
                "from_client": message.sender,
                "trail": list(client.trail)[-12:],
            }
        )
    kinds = Counter(f["kind"] for f in soak.faults)
    counts, ledger = soak.counts, soak.ledger
    report: dict[str, Any] = {
        "sent": counts["sent"],
        "acked": ledger.counts["acked"],
        "expected_deliveries": audit["expected_deliveries"],
        "delivered": audit["delivered"],
        "lost": audit["lost"],
        "duplicates": ledger.counts["duplicates"],
        "gaps": audit["gaps"],
        "gaps_by_fault": audit["gaps_by_fault"],
        # --cluster: acked messages the promoted replica's stream lacked, and their deliveries
        # that never came (charged to the failover, as gaps are to their fault; not in "lost")
        "unreplicated": audit["unreplicated"],
        "unreplicated_by_fault": audit["unreplicated_by_fault"],
        "lost_unreplicated": audit["lost_unreplicated"],
        "lost_unreplicated_by_fault": audit["lost_unreplicated_by_fault"],
        "leaked_keys": leaks.get("leaked", -1),
        # SPEC §15: the presence keys against the clients' rooms at the end (still connected);
        # the users hashes, ws:rooms members and instances' room lists left once all are gone;
        # read markers that name no message their user read; read events that went backwards
        "presence_mismatches": presence.get("mismatches", -1),
        "room_keys_left": rooms_end.get("left", -1),
        "bad_read_markers": rooms_end.get("bad_read_markers", -1),
        "read_backwards": ledger.counts["read_backwards"],
        "read_events_foreign": ledger.counts["read_events_foreign"],
        "faults": len(soak.faults),
        "faults_by_kind": dict(kinds),
        "unexpected_exits": len(soak.unexpected),
        "rss_start_kib": soak.rss_start,
        "rss_end_kib": soak.rss_end,
        "tracebacks": tracebacks,
        # the rest: how the run went
        "seed": soak.args.seed,
        "minutes": soak.args.minutes,
        "instances": len(soak.slots),
        "clients": len(soak.clients),
        "rooms": soak.args.rooms,
        "rate": soak.rate,
        "netem": soak.net.impl if soak.net is not None else None,
        "redis": "cluster" if soak.args.cluster else "single",
        "failover_s": [f["failover_s"] for f in soak.faults if "failover_s" in f],
        "fault_failures": sum(str(f.get("target", "")).startswith("failed") for f in soak.faults),
        "wall_s": round(wall, 1),
        "drain_s": result.get("drain_s"),
        "clients_ready_at_end": result.get("clients_ready_at_end"),
        "send_errors": dict(ledger.send_errors),
        "send_unknown": counts["send_unknown"],
        "extra_deliveries": audit["extra_deliveries"],
        "own_replayed": ledger.counts["own_replayed"],
        "unacked_published": audit["unacked_published"],
        "published_after_error": audit["published_after_error"],
        "published_after_error_samples": audit["published_after_error_samples"],
        "delivered_live": ledger.counts["delivered_live"],
        "delivered_replay": ledger.counts["delivered_replay"],
        "rejoins": ledger.counts["rejoins"],
        "recovered_false": ledger.counts["recovered_false"],
        "order_violations": ledger.counts["order_violations"],
        "stray_messages": ledger.counts["stray_messages"],
        "id_collisions": ledger.counts["id_collisions"],
        "payload_mismatches": ledger.counts["payload_mismatches"],
        "connects": counts["connects"],
        "visits": counts["visits"],
        "visits_joined": counts["visits_joined"],
        "presence_joins": ledger.counts["presence_join"],
        "presence_leaves": ledger.counts["presence_leave"],
        "presence_repeats": ledger.counts["presence_repeats"],
        "presence_mismatches_first": presence.get("mismatches_first"),
        "presence_settle_s": presence.get("settle_s"),
        "reads": ledger.counts["reads"],
        "read_errors": dict(ledger.read_errors),
        "read_events": ledger.counts["read_events"],
        "read_backwards_by_fault": dict(ledger.read_backwards_by_fault),
        "read_events_reordered": ledger.counts["read_events_reordered"],
        "read_markers_checked": rooms_end.get("read_markers"),
        "read_marker_keys": leaks.get("read_marker_keys"),
        "refreshes": counts["refreshes"],
        "resets": counts["resets"],
        "churn_closes": counts["churn_closes"],
        "connect_failures": counts["connect_failures"],
        "start_failures": counts["start_failures"],
        "incarnations": [s.incarnation for s in soak.slots],
        "connection_ends": dict(soak.close_codes.most_common(12)),
        "other": {
            k: v
            for k, v in sorted((counts + ledger.counts).items())
            if k.startswith(
                (
                    "refused_",
                    "logout_",
                    "join_error_",
                    "visit_error_",
                    "refresh_error_",
                    "error_",
                    "client_error_",
                )
            )
        },
        "reap_locks": leaks.get("reap_locks"),
        "masters_checked": leaks.get("masters_checked"),
        "unreplicated_samples": audit["unreplicated_samples"],
        "leaked_keys_sample": leaks.get("leaked_keys_sample", []),
        "presence_mismatch_samples": presence.get("samples", []),
        "room_keys_left_sample": rooms_end.get("left_sample", []),
        "bad_read_marker_samples": rooms_end.get("bad_read_marker_samples", []),
        "read_backwards_samples": ledger.samples["read_backwards"][:5],
        "read_foreign_samples": ledger.samples["read_foreign"][:5],
        "clean_at_stop": result.get("clean_at_stop"),
        "clean": result.get("clean"),
        "unexpected_exit_details": soak.unexpected,
        "traceback_samples": traceback_samples,
        "duplicate_samples": ledger.samples["duplicates"][:5],
        "order_samples": ledger.samples["order"][:5],
        "lost_samples": lost_samples[:10],
        "fault_log": [
            {k: v for k, v in f.items() if k not in ("unix", "end_unix")} for f in soak.faults
        ],
        "error": error,
        "workdir": str(soak.workdir),
    }
    report["ok"] = (
        error is None
        and report["lost"] == 0
        and report["duplicates"] == 0
        and report["leaked_keys"] == 0
        and report["presence_mismatches"] == 0
        and report["room_keys_left"] == 0
        and report["bad_read_markers"] == 0
        and report["read_backwards"] == 0
        and report["read_events_foreign"] == 0
        and report["unexpected_exits"] == 0
        and report["tracebacks"] == 0
    )
    return report
