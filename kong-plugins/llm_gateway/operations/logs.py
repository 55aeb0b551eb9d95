"""The plugin server's log: one JSON object per line on stderr, with the request id where there is one.

Kong writes the plugin server's stderr into its error log at INFO, one line per line, prefixed with its own
timestamp and ``[llm-gateway]``; a line that is a JSON object after that prefix is what log pipelines (Loki,
Elasticsearch, CloudWatch) can parse without a grok pattern. Every line has ``ts`` (UTC, ISO 8601, ms),
``level`` (DEBUG…CRITICAL, filtered by ``LLM_GATEWAY_LOG_LEVEL``), ``logger`` and ``message``; ``request_id``
(Kong's request id, set by the listener per request through a context variable, so every line logged while
serving a request carries it without being passed it); ``exception`` when one was logged (its traceback as
one string: still one line).

The usage record stays its own event: logger ``llm_gateway.usage``, ``"event": "usage"`` and the record's
fields at the top level of the same object (``accounting.UsageRecord.to_json``), so billing pipelines select
``event == "usage"``. ``LLM_GATEWAY_LOG_FORMAT=text`` gives the classic one-line text format instead.

Nothing here adds content to what is logged: the secret scan (tests/operations/test_secrets.py) reads these lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

USAGE_LOGGER = "llm_gateway.usage"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
request_id: ContextVar[str | None] = ContextVar("llm_gateway_request_id", default=None)


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JSONFormatter(logging.Formatter):
    """A log record as one JSON object (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        head: dict[str, Any] = {"ts": _timestamp(record.created), "level": record.levelname, "logger": record.name}
        message = record.getMessage()
        if record.name == USAGE_LOGGER and len(message) > 2 and message[0] == "{" and message[-1] == "}":
            # the record is already one JSON object (RecordSink.emit): spliced in, not parsed and re-encoded
            head["event"] = "usage"
            return json.dumps(head, separators=(",", ":"))[:-1] + "," + message[1:]
        head["message"] = message
        current = request_id.get()
        if current is not None:
            head["request_id"] = current
        if record.exc_info:
            head["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            head["exception"] = record.exc_text
        if record.stack_info:
            head["stack"] = self.formatStack(record.stack_info)
        return json.dumps(head, separators=(",", ":"), ensure_ascii=False, default=str)


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """The root logger writes to stderr, as JSON unless ``LLM_GATEWAY_LOG_FORMAT=text``; Python's warnings and
    exceptions nobody caught (in any thread) become log lines too, rather than multi-line text."""
    level = (level or os.environ.get("LLM_GATEWAY_LOG_LEVEL") or "INFO").upper()
    fmt = (fmt or os.environ.get("LLM_GATEWAY_LOG_FORMAT") or "json").lower()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT) if fmt == "text" else JSONFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        root.setLevel(level)
    except ValueError:
        root.setLevel(logging.INFO)
        logging.getLogger("llm_gateway").warning("LLM_GATEWAY_LOG_LEVEL=%s is not a level; using INFO", level)
    logging.captureWarnings(True)
    uncaught = logging.getLogger("llm_gateway.uncaught")

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        uncaught.critical("uncaught %s", kind.__name__, exc_info=(kind, value, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit and args.exc_value is not None:
            uncaught.error("uncaught %s in thread %s", args.exc_type.__name__,
                           args.thread.name if args.thread else "?",
                           exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def adopt(*names: str) -> None:
    """Route libraries' own loggers (LiteLLM attaches a text handler of its own at import) through ours."""
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            for kept in handler.filters:  # LiteLLM's secret redaction sits on its handler: it moves to the logger
                if kept not in logger.filters:
                    logger.addFilter(kept)
        logger.propagate = True
