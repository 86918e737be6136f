"""A minute of bench/soak.py: chat under instance kills and drains, Redis pauses and restarts,
socket resets, logouts and bans (and, with --hooks, the hooks application killed), with
nothing acknowledged lost, nothing twice, nothing leaked; with clients visiting rooms (presence
events on) and sending read markers, presence per user that agrees with the clients at the end,
no presence record left once they are gone, and read markers that never move back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: what the soak checks, each 0 when it held
CHECKS = (
    "lost",
    "duplicates",
    "leaked_keys",
    "presence_mismatches",
    "room_keys_left",
    "bad_read_markers",
    "read_backwards",
    "read_events_foreign",
    "unexpected_exits",
)


def soak(*options: str) -> dict[str, Any]:
    """A minute of the soak with ``options``; its report, once the invariant held."""
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "1", "--seed", "7"]
    command += ["--clients", "60", "--rooms", "12", "--rate", "15", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    lines = done.stdout.splitlines()
    assert lines, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(lines[-1])
    summary = {k: report.get(k) for k in CHECKS}
    details = json.dumps(
        {
            **summary,
            "tracebacks": report.get("traceback_samples"),
            "lost": report.get("lost_samples"),
            "leaked": report.get("leaked_keys_sample"),
            "presence_samples": report.get("presence_mismatch_samples"),
            "rooms_left_samples": report.get("room_keys_left_sample"),
            "read_marker_samples": report.get("bad_read_marker_samples"),
            "read_backwards_samples": report.get("read_backwards_samples"),
            "read_foreign_samples": report.get("read_foreign_samples"),
            "exits": report.get("unexpected_exit_details"),
            "error": report.get("error"),
            "logs": report.get("workdir"),
        },
        indent=1,
    )
    assert done.returncode == 0, details
    assert summary == dict.fromkeys(CHECKS, 0)
    assert report["tracebacks"] == 0
    # it did something: traffic, faults of most kinds, reconnects that recovered, room visits
    # with presence events, read markers that reached the others and were checked at the end
    assert report["expected_deliveries"] > 3000
    assert report["delivered"] + report["gaps"] == report["expected_deliveries"]
    assert report["rejoins"] > 0
    assert report["visits_joined"] > 30
    assert report["presence_joins"] > 0
    assert report["presence_leaves"] > 0
    assert report["reads"] > 100
    assert report["read_events"] > 0
    assert report["read_markers_checked"] > 0
    return report


def test_a_minute_of_faults_loses_nothing():
    report = soak("--fault-interval", "5")
    assert report["acked"] > 400
    assert report["faults"] >= 6
    assert len(report["faults_by_kind"]) >= 5
    assert report["refreshes"] > 0


def test_a_minute_of_faults_with_hooks_over_http_loses_nothing():
    """Every hook asks an HTTP application, which is killed and restarted among the faults:
    meanwhile handshakes are refused and sends answered unavailable, and none is lost."""
    report = soak("--fault-interval", "4", "--hooks")
    assert report["acked"] > 300
    assert "hooks_restart" in report["faults_by_kind"]
    assert report["faults"] >= 8
