from __future__ import annotations

import time

import attrs
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trio_chat._errors import ProtocolError
from trio_chat._messages import Send, encode, parse_client_message
from trio_chat._metrics import (
    CLIENT_FRAME_TYPES,
    HANDSHAKE_OUTCOMES,
    SERVER_FRAME_TYPES,
    Metrics,
)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    assert sample is not None, f"no sample {name}{labels}"
    return sample


@attrs.define
class FakeHub:
    sessions: dict[str, object] = attrs.Factory(dict)
    reconnects: int = 0
    redis_up: bool = True


def test_two_instances_do_not_clash_and_leave_the_global_registry_alone() -> None:
    first, second = Metrics(), Metrics()
    first.handshake("accepted")
    assert value(first, "trio_chat_handshakes_total", outcome="accepted") == 1
    assert value(second, "trio_chat_handshakes_total", outcome="accepted") == 0
    assert prometheus_client.REGISTRY.get_sample_value("trio_chat_sessions") is None


def test_every_known_series_exists_from_the_start() -> None:
    metrics = Metrics(process=False)
    for outcome in HANDSHAKE_OUTCOMES:
        assert value(metrics, "trio_chat_handshakes_total", outcome=outcome) == 0
    for kind in (*CLIENT_FRAME_TYPES, "invalid"):
        assert value(metrics, "trio_chat_frames_in_total", type=kind) == 0
    for kind in (*SERVER_FRAME_TYPES, "invalid"):
        assert value(metrics, "trio_chat_frames_out_total", type=kind) == 0
    for name in (
        "trio_chat_connections",
        "trio_chat_sessions",
        "trio_chat_fanout_deliveries_total",
        "trio_chat_slow_consumer_closes_total",
        "trio_chat_signals_dropped_total",
        "trio_chat_redis_reconnects_total",
        "trio_chat_redis_cluster_map_reads_total",
        "trio_chat_redis_cluster_redirections_total",
        "trio_chat_publish_seconds_count",
        "trio_chat_pump_lag_seconds_count",
    ):
        assert value(metrics, name) == 0


def test_handshakes_by_outcome() -> None:
    metrics = Metrics(process=False)
    for outcome in ("accepted", "accepted", "invalid_token", "banned", "some_new_code"):
        metrics.handshake(outcome)
    metrics.handshake("Not A Code!")  # never a series of its own
    assert value(metrics, "trio_chat_handshakes_total", outcome="accepted") == 2
    assert value(metrics, "trio_chat_handshakes_total", outcome="invalid_token") == 1
    assert value(metrics, "trio_chat_handshakes_total", outcome="banned") == 1
    assert value(metrics, "trio_chat_handshakes_total", outcome="some_new_code") == 1
    assert value(metrics, "trio_chat_handshakes_total", outcome="other") == 1


def test_frames_in_by_type_unknown_and_unparsable_are_invalid() -> None:
    metrics = Metrics(process=False)
    for raw in (
        '{"type":"join","room":"r"}',
        '{"type":"ping"}',
        '{"type":"ping"}',
        "nope",
        '{"type":"x"}',
    ):
        try:
            message = parse_client_message(raw)
        except ProtocolError:
            metrics.frame_in(None)
        else:
            metrics.frame_in(message)
    metrics.frame_in(Send("r", {"text": "hi"}))
    assert value(metrics, "trio_chat_frames_in_total", type="join") == 1
    assert value(metrics, "trio_chat_frames_in_total", type="ping") == 2
    assert value(metrics, "trio_chat_frames_in_total", type="send") == 1
    assert value(metrics, "trio_chat_frames_in_total", type="invalid") == 2


def test_frames_out_by_the_encoded_type() -> None:
    metrics = Metrics(process=False)
    for kind in SERVER_FRAME_TYPES:
        metrics.frame_out(encode(kind, ref=7, x=1))
    metrics.frame_out(encode("message", id="1", room="r", data={"type": "ack"}, ts=1))
    metrics.frame_out(encode("not_a_server_frame"))
    metrics.frame_out('{"kind":"weird"}')
    metrics.frame_out("")
    for kind in SERVER_FRAME_TYPES:
        expected = 2 if kind == "message" else 1
        assert value(metrics, "trio_chat_frames_out_total", type=kind) == expected, kind
    assert value(metrics, "trio_chat_frames_out_total", type="invalid") == 3


def test_fanout_counts_recipients_once_per_message() -> None:
    metrics = Metrics(process=False)
    metrics.fanout("message", 3)
    metrics.fanout("message", 0)
    metrics.fanout("direct", 2)
    assert value(metrics, "trio_chat_fanout_deliveries_total") == 5
    assert value(metrics, "trio_chat_frames_out_total", type="message") == 3
    assert value(metrics, "trio_chat_frames_out_total", type="direct") == 2


def test_publish_time_is_observed_only_for_completed_round_trips() -> None:
    metrics = Metrics(process=False)
    with metrics.publishing():
        time.sleep(0.002)
    with pytest.raises(TimeoutError), metrics.publishing():
        raise TimeoutError
    assert value(metrics, "trio_chat_publish_seconds_count") == 1
    assert 0.002 <= value(metrics, "trio_chat_publish_seconds_sum") < 1
    assert value(metrics, "trio_chat_publish_seconds_bucket", le="0.0001") == 0
    assert value(metrics, "trio_chat_publish_seconds_bucket", le="1.0") == 1


def test_pump_lag_from_the_payload_ts() -> None:
    metrics = Metrics(process=False)
    now_ms = time.time() * 1000
    metrics.pump_lag(int(now_ms) - 1500)
    metrics.pump_lag(now_ms + 60_000)  # the publisher's clock is ahead: no lag
    for junk in ("123", None, True, [1]):
        metrics.pump_lag(junk)
    assert value(metrics, "trio_chat_pump_lag_seconds_count") == 2
    assert value(metrics, "trio_chat_pump_lag_seconds_bucket", le="0.0005") == 1
    assert value(metrics, "trio_chat_pump_lag_seconds_bucket", le="1.0") == 1
    assert value(metrics, "trio_chat_pump_lag_seconds_bucket", le="2.5") == 2
    assert 1.5 <= value(metrics, "trio_chat_pump_lag_seconds_sum") < 2.5


def test_connections_sessions_slow_consumers_and_reconnects() -> None:
    metrics = Metrics(process=False)
    hub = FakeHub()
    metrics.bind_hub(hub)
    with metrics.connection():
        with metrics.connection():
            assert value(metrics, "trio_chat_connections") == 2
        assert value(metrics, "trio_chat_connections") == 1
    with pytest.raises(RuntimeError), metrics.connection():
        raise RuntimeError
    assert value(metrics, "trio_chat_connections") == 0
    hub.sessions.update(a=1, b=2)
    hub.reconnects = 3
    metrics.slow_consumer()
    assert value(metrics, "trio_chat_redis_up") == 1
    hub.redis_up = False
    assert value(metrics, "trio_chat_redis_up") == 0
    assert value(metrics, "trio_chat_sessions") == 2
    assert value(metrics, "trio_chat_redis_reconnects_total") == 3
    assert value(metrics, "trio_chat_slow_consumer_closes_total") == 1


def test_render_is_the_prometheus_text_format() -> None:
    metrics = Metrics()
    metrics.bind_hub(FakeHub(reconnects=1))
    metrics.handshake("accepted")
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["trio_chat_redis_reconnects"].type == "counter"
    assert families["trio_chat_publish_seconds"].type == "histogram"
    assert families["trio_chat_connections"].type == "gauge"
    assert "process_resident_memory_bytes" in families
    assert b'trio_chat_handshakes_total{outcome="accepted"} 1.0' in body
