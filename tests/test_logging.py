from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import trio

from trio_chat._logging import JsonFormatter, log_event, setup_logging

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

SECRET = "0123456789abcdef0123456789abcdef"
FIELDS = {
    "user": "alice",
    "session": "Zm9vYmFyYmF6cXV4cXV1eA",
    "instance": "host-1-abc123",
    "reason": "slow consumer",
    "remote": "127.0.0.1:50123",
    "status": 401,
    "code": "invalid_token",
}


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger (and coredis's) back as pytest had them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    coredis_level = logging.getLogger("coredis").level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("coredis").setLevel(coredis_level)


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("trio_chat._connection")
    return logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, message, args, None, extra=extra
    )


def test_json_line_carries_the_standard_and_extra_fields() -> None:
    line = JsonFormatter().format(_record("refused %s", "127.0.0.1:50123", **FIELDS))
    assert "\n" not in line
    record = json.loads(line)
    assert list(record)[:4] == ["ts", "level", "logger", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])
    assert record["level"] == "INFO"
    assert record["logger"] == "trio_chat._connection"
    assert record["message"] == "refused 127.0.0.1:50123"
    assert {key: record[key] for key in FIELDS} == FIELDS
    # none of LogRecord's own attributes leak in
    assert not {"args", "msg", "levelno", "pathname", "lineno", "created"} & set(record)


def test_a_field_cannot_forge_another_record_and_keeps_its_value() -> None:
    # We never log tokens; the formatter's part is to keep any value inside its own field.
    forged = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n{"level": "CRITICAL", "message": "x"}'
    line = JsonFormatter().format(_record("refused", reason=forged, user="ünï\u2028\x85"))
    assert line.isascii()
    assert len(line.splitlines()) == 1
    record = json.loads(line)
    assert record["reason"] == forged
    assert record["user"] == "ünï\u2028\x85"
    assert record["level"] == "INFO"
    assert record["message"] == "refused"


def test_exceptions_are_one_field() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record("session crashed")
        record.exc_info = sys.exc_info()
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["message"] == "session crashed"
    assert "RuntimeError: boom" in parsed["exc_info"]


@pytest.mark.usefixtures("root_logging")
def test_setup_logging_json_and_text() -> None:
    stream = io.StringIO()
    setup_logging("warning", "json", stream=stream)
    assert logging.getLogger("coredis").level == logging.CRITICAL
    logger = logging.getLogger("trio_chat.test")
    logger.info("below the level")
    logger.warning("cleanup failed", extra={"session": "s1"})
    # a second call replaces our handler, not others'
    before = len(logging.getLogger().handlers)
    setup_logging("debug", "text", stream=stream)
    assert len(logging.getLogger().handlers) == before
    logger.debug("now text")
    json_line, text_line = stream.getvalue().splitlines()
    assert json.loads(json_line)["session"] == "s1"
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} DEBUG trio_chat\.test: now text", text_line
    )


async def test_serve_with_log_format_json_logs_json_lines(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    environ = {
        **os.environ,
        "TRIO_CHAT_AUTH_JWT_SECRET": SECRET,
        "TRIO_CHAT_ADMIN_ENABLED": "false",
    }
    command = [sys.executable, "-m", "trio_chat", "serve", "--port", "0", "--log-format", "json"]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=environ, stderr=sink)
    try:
        with trio.fail_after(10):
            while "listening on" not in log.read_text():
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            while process.poll() is None:
                await trio.sleep(0.05)
        assert process.returncode == 0, log.read_text()
    finally:
        process.kill()
        process.wait()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any("listening on ws://127.0.0.1:" in r["message"] for r in records)
    assert all(r["logger"].startswith("trio_chat") for r in records)


def test_an_event_names_each_field_once_for_text_and_json(caplog) -> None:
    logger = logging.getLogger("trio_chat._connection")
    with caplog.at_level(logging.INFO):
        log_event(logger, logging.INFO, "refused", **FIELDS)
    [record] = caplog.records
    text = (
        "refused user=alice session=Zm9vYmFyYmF6cXV4cXV1eA instance=host-1-abc123 "
        'reason="slow consumer" remote=127.0.0.1:50123 status=401 code=invalid_token'
    )
    assert record.getMessage() == text
    parsed = json.loads(JsonFormatter().format(record))
    assert {key: parsed[key] for key in FIELDS} == FIELDS
    assert parsed["message"] == text


@pytest.mark.parametrize(
    "value", ["a b", 'say "hi"', "k=v", "line\nbreak", "sep\u2028", "nel\x85", "ünï", ""]
)
def test_a_text_value_cannot_break_the_line_or_forge_a_field(caplog, value) -> None:
    logger = logging.getLogger("trio_chat._connection")
    with caplog.at_level(logging.INFO):
        log_event(logger, logging.INFO, "disconnected", user=value, reason="closed")
    message = caplog.records[0].getMessage()
    assert message.isascii()
    assert message.endswith(" reason=closed")
    assert (
        json.loads(message.removeprefix("disconnected user=").removesuffix(" reason=closed"))
        == value
    )
