"""Logging of the service: readable lines, or one JSON object per line for log shippers (`--log-format json`).

Secrets never reach a log line: the values of credential variables seen in the environment at start-up are
replaced by `***` in every message, whatever library logged them. A text line is one record: control characters
of a message (a newline in a folder name) are escaped, so outside strings cannot forge lines.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from typing import Any

import orjson

from common.display_names import escape_controls

SECRET_VARIABLES = ("WANDB_API_KEY", "MMDET_WANDB_DB_URL", "PGPASSWORD")


def secrets_in_env() -> list[str]:
    found = []
    for name in SECRET_VARIABLES:
        value = os.environ.get(name, "")
        if name == "MMDET_WANDB_DB_URL" and "@" in value and ":" in value.split("@", 1)[0]:
            value = value.split("@", 1)[0].rsplit(":", 1)[1]  # the password of a URL
        if len(value) >= 6:
            found.append(value)
    return found


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class ServiceLogHandler(logging.StreamHandler):
    """Our stderr handler. A subclass, because mmcv's get_logger turns every plain root StreamHandler down to
    ERROR (to mute duplicate DDP logs) the first time mmdet logs, which would silence the evaluator's log."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__(sys.stderr)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message>`, the message escaped; a traceback keeps its own lines after it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", "event"? and its ids, "service", "pid", "exc"?}` per line (common/events.py)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None:
            entry["event"] = event
            entry.update(record.event_ids)
        entry.update(service=self.service, pid=record.process)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()  # an id that is a Path is its text


def report(message: str, level: int = logging.INFO) -> bool:
    """With JSON logs, a command's own line (its summary, its error) as one JSON object on stderr, whatever the log
    level, so that stderr stays JSON only; False when logs are text (the caller prints it as it is)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ServiceLogHandler) and isinstance(handler.formatter, JsonFormatter):
            handler.handle(logging.LogRecord("mmdet_wandb.cli", level, __file__, 0, message, None, None))
            return True
    return False


def setup(level: str, log_format: str, service: str) -> None:
    handler = ServiceLogHandler(secrets_in_env())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(TextFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
