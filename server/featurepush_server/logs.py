"""The server's log output: a level, and plain text lines or one JSON object a line."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys


class JsonLines(logging.Formatter):
    """One JSON object a record: time (UTC, RFC 3339), level, logger, message and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Send the process's log records to standard error at `level`, as "text" or "json" lines.

    Like logging.basicConfig, it leaves a process whose logging is already set up (an embedding
    application, a test runner) its own handlers and only sets the level.
    """
    root = logging.getLogger()
    root.setLevel(level.upper())
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
