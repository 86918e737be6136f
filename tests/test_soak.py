"""A minute of bench/soak.py: chat under instance kills and drains, Redis pauses and restarts,
socket resets, logouts and bans, with nothing acknowledged lost, nothing twice, nothing leaked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_minute_of_faults_loses_nothing():
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "1", "--seed", "7"]
    command += ["--clients", "60", "--rooms", "12", "--rate", "15", "--fault-interval", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    lines = done.stdout.splitlines()
    assert lines, done.stderr[-3000:]
    report = json.loads(lines[-1])
    summary = {k: report.get(k) for k in ("lost", "duplicates", "leaked_keys", "unexpected_exits")}
    details = json.dumps(
        {
            **summary,
            "tracebacks": report.get("traceback_samples"),
            "lost": report.get("lost_samples"),
            "leaked": report.get("leaked_keys_sample"),
            "exits": report.get("unexpected_exit_details"),
            "error": report.get("error"),
            "logs": report.get("workdir"),
        },
        indent=1,
    )
    assert done.returncode == 0, details
    assert summary == {"lost": 0, "duplicates": 0, "leaked_keys": 0, "unexpected_exits": 0}
    assert report["tracebacks"] == 0
    # it did something: traffic, faults of most kinds, reconnects that recovered
    assert report["acked"] > 400
    assert report["expected_deliveries"] > 3000
    assert report["delivered"] + report["gaps"] == report["expected_deliveries"]
    assert report["faults"] >= 6
    assert len(report["faults_by_kind"]) >= 5
    assert report["rejoins"] > 0
    assert report["refreshes"] > 0
