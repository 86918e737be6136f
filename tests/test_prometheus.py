"""config/prometheus and config/grafana, checked with the real programs: promtool checks the
scrape configuration and the alert rules and runs their unit tests, a real Prometheus scrapes
two instances and answers a query about them, and every query of the Grafana dashboard names
series that ``/metrics`` really exports.

``make test`` installs Debian's ``prometheus`` (it brings ``promtool``) when it is missing;
without it these tests fail, saying so, as those needing redis-server do.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest
import trio
from _chat import ADMIN, admin_client, make_config, start
from _redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "config" / "prometheus"
DASHBOARD = ROOT / "config" / "grafana" / "trio-chat.json"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: `make test` installs Debian's prometheus")
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "trio-chat-rules.yml"],
        ["test", "rules", "trio-chat-rules.test.yml"],
    ],
)
def test_promtool_accepts_the_configuration_and_the_rules_pass_their_tests(args):
    done = subprocess.run(
        [_binary("promtool"), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _names(expr: str) -> set[str]:
    """The metric names an expression reads (ours and the process collector's)."""
    return set(re.findall(r"\b((?:trio_chat|process)_[a-z_]+)\b", expr))


#: the series names of a family of each type (a labelled family may have no sample yet)
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _exported(text: str) -> set[str]:
    """Every series name ``/metrics`` declares (by its ``# TYPE`` lines) or has a sample of."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        base = family.removesuffix("_total")  # (a counter without samples is typed so)
        names.update(base + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    return names


async def test_every_dashboard_and_alert_query_names_an_exported_series(nursery):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [
        v["query"]["query"]
        for v in dashboard["templating"]["list"]
        if "query" in v and isinstance(v["query"], dict)
    ]
    rules = (PROMETHEUS / "trio-chat-rules.yml").read_text()
    queries += re.findall(r"expr: (.*)", rules) + re.findall(r"^\s+(.*trio_chat.*)$", rules, re.M)
    named = set().union(*(_names(q) for q in queries))
    assert len(dashboard["panels"]) >= 10
    assert "trio_chat_redis_up" in named
    server = await start(nursery, make_config(admin=ADMIN))
    async with admin_client(server, key=None) as http:
        exported = _exported((await http.get("/metrics")).text)
    assert named <= exported, f"not exported: {sorted(named - exported)}"


async def test_a_real_prometheus_scrapes_two_instances(redis_server, nursery):
    binary = _binary("prometheus")
    servers = [
        await start(nursery, make_config(redis_server.url, f"inst-{n}", admin=ADMIN))
        for n in (1, 2)
    ]
    targets = [s.admin_url.removeprefix("http://").rstrip("/") for s in servers]  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory(prefix="trio-chat-prometheus-") as directory:
        # ours, with the instances as targets and a 1 s scrape
        config = (PROMETHEUS / "prometheus.yml").read_text()
        config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
        config = re.sub(
            r"(- targets:\n)(\s+- .*\n)+",
            lambda m: m.group(1) + "".join(f"          - {t}\n" for t in targets),
            config,
        )
        config = config.replace("- trio-chat-rules.yml", f"- {PROMETHEUS / 'trio-chat-rules.yml'}")
        (Path(directory) / "prometheus.yml").write_text(config)
        port = free_port()
        log = Path(directory) / "prometheus.log"
        with log.open("wb") as stderr:  # the child keeps its own copy
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={directory}/prometheus.yml",
                    f"--storage.tsdb.path={directory}/data",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as api:
                with trio.fail_after(30):
                    while True:
                        await trio.sleep(0.5)
                        try:
                            r = await api.get(
                                "/api/v1/query",
                                params={"query": 'trio_chat_redis_up{job="trio-chat"}'},
                            )
                        except httpx.TransportError:
                            continue  # not listening yet
                        found = r.json()["data"]["result"] if r.status_code == 200 else []
                        if len(found) == 2:
                            break
                    assert sorted(f["metric"]["instance"] for f in found) == sorted(targets)
                    assert {f["value"][1] for f in found} == {"1"}
                    rules = (await api.get("/api/v1/rules")).json()["data"]["groups"]
                    # (the log says why, when it did not start or scrape)
                    assert rules, log.read_text()
                    assert {rule["name"] for g in rules for rule in g["rules"]} >= {
                        "TrioChatInstanceDown",
                        "TrioChatRedisUnavailable",
                    }
        finally:
            process.terminate()
            process.wait(10)
