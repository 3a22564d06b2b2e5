"""How a node's log lines look: ``[server] log_format = "text"`` (the default, for people) or
``"json"`` (one JSON object per line, for log shippers and ``jq``).

Both carry the same facts. A JSON line always has ``time`` (ISO 8601 with milliseconds, UTC),
``level``, ``logger``, ``node`` and ``shard`` and ``message``; an error's traceback comes as
``exc``. The access log (:mod:`distribkv.http.accesslog`) writes its lines in the format of the
handler that this module configures, adding ``method``, ``path``, ``route``, ``status``,
``duration_ms``, ``bytes`` and ``remote``. No line carries a value; a key appears only at debug
level (``distribkv -v serve``), and only in the access log.

The library never configures logging (``distribkv serve`` does, through :func:`configure`); the
format is found from the handlers in place (:func:`json_formatter`), so a node run as a
library inside another program logs in that program's format.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["LOG_FORMATS", "TEXT_FORMAT", "JsonFormatter", "configure", "json_formatter"]

LOG_FORMATS = ("text", "json")

#: The text format of every ``distribkv`` command (and of access-log lines in text).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def iso_time(at: float) -> str:
    """``at`` (seconds since the epoch) as ``2026-12-05T10:11:12.345Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record. ``fields`` (the node and its shard) are in every line,
    serialised once: each line only adds what changes."""

    def __init__(self, fields: dict[str, Any] | None = None):
        super().__init__()
        self.fields = dict(fields or {})
        # '"node": "shard-0/leader", "shard": "shard-0"' written once, spliced into each line.
        inner = json.dumps(self.fields)[1:-1]
        self.prefix = ", " + inner if inner else ""

    def line(self, at: float, level: str, logger: str, body: dict[str, Any]) -> str:
        """A JSON line (without its newline) for a record made at ``at``."""
        head = json.dumps({"time": iso_time(at), "level": level, "logger": logger})[:-1]
        rest = json.dumps(body, default=str)[1:]
        return head + self.prefix + (", " + rest if len(rest) > 1 else "}")

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {"message": record.getMessage()}
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            body["exc"] = record.exc_text
        if record.stack_info:
            body["stack"] = self.formatStack(record.stack_info)
        return self.line(record.created, record.levelname, record.name, body)


def configure(log_format: str, fields: dict[str, Any]) -> None:
    """Put every handler of the root logger in ``log_format`` ("text" leaves them as they
    are); ``fields`` go into every JSON line."""
    if log_format == "text":
        return
    if log_format != "json":
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    formatter = JsonFormatter(fields)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def json_formatter(logger: logging.Logger) -> JsonFormatter | None:
    """The JSON formatter that lines of ``logger`` go through, or None when they are text:
    the first handler up the logger's hierarchy decides (as it writes them)."""
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            formatter = handler.formatter
            return formatter if isinstance(formatter, JsonFormatter) else None
        if not current.propagate:
            break
        current = current.parent
    return None
