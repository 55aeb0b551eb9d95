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

Inside Kong, stderr is a pipe that nginx's worker 0 reads between its requests: a blocking write to it from the
event loop would stall every request of the process whenever the pipe is full (one usage line per request fills
its 64 KB in ~100 requests; not seen in the benchmark, where worker 0 kept up, but nothing bounds how long it
may not). So once a process serves (``write_in_background``), lines are formatted where they are logged (the
request id is a context variable) and written by a thread of their own: the stdlib's QueueHandler and
QueueListener. The zygote, which forks workers and must not run threads, keeps writing synchronously.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
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


#: lines waiting for the writer thread, at most; beyond it the logging call waits (a line is never dropped)
BACKLOG_LINES = 100_000
STOP_WAIT_S = 5.0  # how long stopping waits for the writer (a reader that stopped reading must not hold an exit)


class _WaitingQueueHandler(logging.handlers.QueueHandler):
    """The stdlib's QueueHandler (it formats in the caller, where the request id's context variable is), but
    one that waits when the queue is full instead of dropping the line."""

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(record)


_writer: tuple[logging.Logger, logging.Handler, logging.Handler, logging.handlers.QueueListener] | None = None


def write_in_background(logger: logging.Logger | None = None) -> None:
    """This process serves now: ``logger``'s (the root's) handlers write from a stdlib QueueListener thread,
    the event loop only formats and queues (see the module docstring). A process forked later writes
    synchronously again (its writer thread stayed behind), until it calls this itself."""
    global _writer
    logger = logger if logger is not None else logging.getLogger()
    if _writer is not None or not logger.handlers:
        return
    original = logger.handlers[0]
    lines: queue.Queue[logging.LogRecord] = queue.Queue(BACKLOG_LINES)
    queued = _WaitingQueueHandler(lines)
    queued.setFormatter(original.formatter)
    # the listener's handler gets records whose message is the formatted line: it writes them as they are
    out = logging.StreamHandler(getattr(original, "stream", sys.stderr))
    out.setFormatter(logging.Formatter("%(message)s"))
    listener = logging.handlers.QueueListener(lines, out)
    logger.removeHandler(original)
    logger.addHandler(queued)
    listener.start()
    _writer = (logger, original, queued, listener)


def stop_writing_in_background(timeout: float = STOP_WAIT_S) -> None:
    """Write what is queued (waiting at most ``timeout``) and go back to synchronous writes: at exit."""
    global _writer
    if _writer is None:
        return
    logger, original, queued, listener = _writer
    _writer = None
    logger.removeHandler(queued)
    logger.addHandler(original)
    stopping = threading.Thread(target=listener.stop, name="llm_gateway.log-stop", daemon=True)
    stopping.start()
    stopping.join(timeout)


def _after_fork_in_child() -> None:
    global _writer
    if _writer is not None:
        logger, original, queued, _ = _writer
        _writer = None
        logger.removeHandler(queued)
        logger.addHandler(original)


os.register_at_fork(after_in_child=_after_fork_in_child)


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
