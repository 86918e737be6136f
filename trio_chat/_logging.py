"""Process-wide logging set-up for the command line: plain text or one JSON object per line.

Only the ``trio-chat`` command calls :func:`setup_logging`; embedders configure logging
themselves. Structured fields go in ``extra=`` (``user``, ``session``, ``instance``,
``reason``, ``remote``, ``status``, ``code``...): the JSON format emits each as a key of its
own, the text format shows the message alone.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TextIO

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "setup_logging"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: Sequence[LogFormat] = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
