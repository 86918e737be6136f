"""Profiling with py-spy: a pass's load generator run with py-spy on the servers, the
summaries of the raw profiles, and the extra profiled trio-chat passes of --profile,
--profile-handshakes and --profile-connect."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import cast

from .processes import _child_setup
from .settings import BENCH_PYTHON, LOADGEN, BenchError


def _py_spy(pid: int, seconds: int, kind: str, target: str) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` for ``seconds`` into ``target`` (format ``kind``), by
    function (-F); idle samples excluded (py-spy's default)."""
    command = [str(BENCH_PYTHON.parent / "py-spy"), "record", "--pid", str(pid), "--duration"]
    command += [str(seconds), "--format", kind, "-F", "-o", target]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_after_opening(procs: list[subprocess.Popen[bytes]], workdir: Path, n: int) -> str:
    """Wait for ``procs`` (py-spy); stop them with SIGINT (they write what they have) once the
    trio-chat logs in ``workdir`` show ``n`` connections of workload C's users idle-*.
    Returns why they stopped."""
    needle = b": connected user=idle-"
    offsets: dict[Path, int] = {}
    seen = 0
    while any(p.poll() is None for p in procs):
        for log in workdir.glob("trio-*.log"):
            with log.open("rb") as source:
                source.seek(offsets.get(log, 0))
                data = source.read()
            whole = data[: data.rfind(b"\n") + 1]  # a line still being written: next time
            offsets[log] = offsets.get(log, 0) + len(whole)
            seen += whole.count(needle)
        if seen >= n:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            return "at the end of the opening"
        time.sleep(0.05)
    return "after --profile-seconds"


def run_profiled(
    command: list[str],
    timeout: float,
    workdir: Path,
    pids: list[int],
    profile: dict[str, object],
    trigger: bytes = b"SENDING",
) -> dict[str, object]:
    """Run the load generator and, once it prints ``trigger`` on stderr, py-spy on each of
    ``pids``: --format raw (collapsed stacks, aggregated by function), then a flame graph SVG.
    With profile["opening"] = N (workload C): raw only, from the trigger on, and stopped early
    once the servers have logged the N connections (at most as long as the opening lasts).
    With profile["until"] = a line of the generator's: raw only, stopped when it prints it."""
    seconds = int(profile["seconds"])  # type: ignore[call-overload]
    out = Path(str(profile["out"]))
    opening = int(profile.get("opening", 0))  # type: ignore[call-overload]
    until = cast("bytes | None", profile.get("until"))
    raws = [f"{out}-instance{index}.txt" for index in range(1, len(pids) + 1)]
    procs: list[subprocess.Popen[bytes]] = []
    recorded: dict[str, object] = {}
    started = time.monotonic()  # again when py-spy starts
    stdout_path = workdir / "loadgen.out"
    with stdout_path.open("wb") as sink:
        loadgen = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.PIPE, cwd=LOADGEN, preexec_fn=_child_setup
        )
        try:
            assert loadgen.stderr is not None
            for raw in loadgen.stderr:
                sys.stderr.write(raw.decode(errors="replace"))
                if until and procs and until in raw and not recorded:
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGINT)
                    for p in procs:
                        p.wait(30)
                    recorded = {
                        "profiled_s": round(time.monotonic() - started, 2),
                        "profile_stopped_at": "when the generator printed "
                        + until.decode(errors="replace"),
                    }
                    continue
                if trigger not in raw or procs:
                    continue
                if not opening and not until:
                    time.sleep(1.0)  # past the first second of the step
                started = time.monotonic()
                procs += [
                    _py_spy(pid, seconds, "raw", path) for pid, path in zip(pids, raws, strict=True)
                ]
                if opening:
                    stop = _stop_after_opening(procs, workdir, opening)
                    for p in procs:
                        p.wait(30)
                    recorded = {
                        "profiled_s": round(time.monotonic() - started, 2),
                        "profile_stopped_at": stop,
                    }
                    print(f"py-spy stopped {stop}: {recorded['profiled_s']} s", file=sys.stderr)
                    continue
                if until:
                    continue
                # A flame graph of the same step, right after the raw profile.
                for p in procs:
                    p.wait(seconds + 30)
                procs += [
                    _py_spy(pid, seconds, "flamegraph", f"{out}-instance{index}.svg")
                    for index, pid in enumerate(pids, start=1)
                ]
            code = loadgen.wait(timeout)
        finally:
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(seconds + 30)
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if loadgen.poll() is None:
                loadgen.kill()
                loadgen.wait()
    text = stdout_path.read_text()
    if code != 0:
        raise BenchError(f"load generator exited {code}; stdout: {text[-2000:]}")
    result = dict(json.loads(text.strip().splitlines()[-1]))
    # the raw profiles written (a layout with one process profiles one)
    result["profile_files"] = [path for path in raws if Path(path).exists()]
    return result | recorded


def summarize_profile(path: Path, top: int = 25) -> str:
    """Self and total share of samples per function, from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
    lines = [f"{path.name}: {samples} samples (py-spy, 100 Hz, idle excluded)", ""]
    lines.append(f"{'self %':>7} {'total %':>8}  function (file)   -- top {top} by self time")
    for frame, count in self_counts.most_common(top):
        share, total = 100 * count / samples, 100 * total_counts[frame] / samples
        lines.append(f"{share:7.1f} {total:8.1f}  {frame}")
    lines += ["", f"{'total %':>8}  function (file)   -- top {top} by total (inclusive) time"]
    for frame, count in total_counts.most_common(top):
        lines.append(f"{100 * count / samples:8.1f}  {frame}")
    return "\n".join(lines) + "\n"


def write_profile_summary(result: dict[str, object], out: str, header: str) -> str:
    """``header`` and the summary of each raw profile of ``result``; also ``out``-summary.txt."""
    files = cast("list[str]", result.get("profile_files") or [])
    text = "\n".join([header, "", *(summarize_profile(Path(path)) for path in files)])
    Path(f"{out}-summary.txt").write_text(text)
    return text
