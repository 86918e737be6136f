"""Logging: events with fields, and the command line's set-up (plain text or JSON lines).

An event is one call, :func:`log_event`, that names each field once (``user``, ``session``,
``instance``, ``reason``, ``remote``, ``status``, ``code``...): the message reads
``connected user=alice session=...`` in any handler, and each field is also an attribute of
the record, which the JSON format emits as a key of its own. Only the ``trio-chat`` command
calls :func:`setup_logging`; embedders configure logging themselves.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TextIO

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "log_event", "setup_logging"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: Sequence[LogFormat] = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: object) -> None:
    """Log ``event`` with its fields, each named once.

    The message is ``event key=value ...`` (logfmt: a value with a space, a quote, an ``=`` or
    anything but printable ASCII is written as a JSON string, so no value can break the line
    or pass for another field); ``extra=fields`` makes each field a key of the JSON record.
    """
    if logger.isEnabledFor(level):
        text = " ".join([event, *(f"{key}={_logfmt(value)}" for key, value in fields.items())])
        logger.log(level, text, extra=fields, stacklevel=2)


_BARE = re.compile(r"[!#-<>-~]+")  # printable ASCII but space, '"' and '='


def _logfmt(value: object) -> str:
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class JsonFormatter(_JsonFormatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC, ms), ``level``, ``logger``,
    ``message``, then every ``extra=`` field, and ``exc_info`` with a traceback.

    Values are JSON-escaped, non-ASCII included, so a field holding a line break (LF, but
    also U+0085 or U+2028) cannot start a forged record.
    """

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        # ts first: it is what a reader (or a log shipper) looks for.
        created = datetime.fromtimestamp(record.created, UTC)
        log_data["ts"] = created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        super().add_fields(log_data, record, message_dict)


def setup_logging(
    level: str, fmt: LogFormat = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record at ``level`` or above to ``stream``, as text or JSON lines.

    Installs one handler on the root logger; calling again replaces the handler it installed
    before (and no other). Also quiets ``coredis``, which logs a traceback for each failed
    connection attempt where ours say it in one line.

    Args:
        level: a name from :data:`LOG_LEVELS`, any case.
        fmt: ``"text"`` (``<time> <LEVEL> <logger>: <message>``) or ``"json"``.
        stream: where to write; None means ``sys.stderr`` (journald reads it under systemd).

    Returns:
        The installed handler.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("coredis").setLevel(logging.CRITICAL)
    return handler


_HANDLER_NAME = "trio-chat"
