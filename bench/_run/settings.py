"""run.py's settings: paths, the systems and trio-chat layouts, the settings main() sets once
(one-element lists and dicts, changed in place so that every module sees them), BenchError
and the token and percentile helpers."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent  # bench/_run/settings.py
ROOT = BENCH.parent
LOADGEN = BENCH / "loadgen"
PEERS = BENCH / "peers"
NODE_PEER = PEERS / "socketio-node"
TRIO_PYTHON = Path(os.environ.get("TRIO_CHAT_PYTHON", ROOT / ".venv" / "bin" / "python"))
BENCH_PYTHON = Path(os.environ.get("BENCH_PYTHON", BENCH / ".venv" / "bin" / "python"))
SECRET = "bench-secret-" + "s" * 51  # 64 characters
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
SYSTEMS = {"trio": "trio-chat", "socketio": "python-socketio", "socketio-node": "Node.js Socket.IO"}
#: the short names of the ratio columns (trio-chat / each other system)
RATIO_NAMES = {"socketio": "sio", "socketio-node": "node"}
#: the load generator's client for each system: both Socket.IO peers speak the same protocol
LOADGEN_SYSTEM = {"trio": "trio", "socketio": "socketio", "socketio-node": "socketio"}
#: --trio-layout: trio-chat processes x workers per process (the peers are always 2 x 1)
TRIO_LAYOUTS = {"2x1": (2, 1), "1x1": (1, 1), "1x2": (1, 2)}
LAYOUT_NOTES = {
    "2x1": "two instances, one worker each",
    "1x1": "one instance (the generator gets its URL twice)",
    "1x2": "one `serve --workers 2` process: two workers on one port (SO_REUSEPORT), the "
    "generator gets its URL twice and the kernel spreads the connections",
}
TRIO_LAYOUT: list[str] = ["2x1"]
#: --history-size: TRIO_CHAT_HISTORY_SIZE for the trio-chat instances (None: the server's
#: default, 200); 0 turns history off, so a send is a bare PUBLISH instead of the script
HISTORY_SIZE: list[int | None] = [None]
#: bench/hooks.py: how the trio-chat instances ask the application before each send (SPEC
#: §14): "none" (no hooks), "python" (an in-process hook that allows,
#: peers/trio_python_hooks.py) or "http" (hooks.url, one peers/hooks_allow.py per instance)
HOOK_VARIANTS = ("none", "python", "http")
TRIO_HOOKS: list[str] = ["none"]
#: --trio-config: a TOML file the trio-chat instances get with ``--config`` (the ``[[rooms]]``
#: options are set in a file only, e.g. peers/presence_events.toml); None: no file
TRIO_CONFIG: list[Path | None] = [None]
HOOKS_SECRET = "bench-hooks-secret"
#: --redis: what the instances of a pass run on: one redis-server, or a Redis Cluster
#: (tests/_redis_cluster.py: 3 masters, 1 replica each)
REDIS_MODES = ("single", "cluster")
REDIS_LABELS = {"single": "one redis-server", "cluster": "Redis Cluster (3 masters + 3 replicas)"}
#: --cluster-hz and --cluster-replicas: the cluster's nodes' hz (the one redis-server runs at
#: Redis's default, 10; the test fixture's default is 100) and replicas per master
CLUSTER_OPTIONS: dict[str, int] = {"hz": 10, "replicas_per_master": 1}


def cluster_label() -> str:
    """E.g. "Redis Cluster (3 masters + 3 replicas, hz 10)"."""
    replicas = CLUSTER_OPTIONS["replicas_per_master"]
    shape = f"3 masters + {3 * replicas} replicas" if replicas else "3 masters, no replicas"
    return f"Redis Cluster ({shape}, hz {CLUSTER_OPTIONS['hz']})"


#: before the measured part of a pass: how long to read the Redis processes' idle CPU
IDLE_SAMPLE_S = 3.0
#: appended to trio-chat's label while the cluster passes' tables are printed
LABEL_REDIS: list[str] = [""]
PR_SET_PDEATHSIG = 1


def token(user: str) -> str:
    """An hour's HS256 token for ``user``, signed with the instances' secret."""
    import jwt  # the bench venv's scripts that never mint one need not have it

    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


def percentile(samples: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class BenchError(Exception):
    """A server did not start, or the load generator failed."""


TRIO_ENV: dict[str, str] = {}  # --trio-env KEY=VALUE, for experiments (not in the README run)
#: where `python -m trio_chat` runs: a copy of trio_chat/ taken at the start of the run (other
#: engineers edit trio_chat/ meanwhile; every pass must measure the same code), or the tree
TRIO_SRC: list[Path] = [ROOT]
SOURCE_NOTE: list[str] = [""]
