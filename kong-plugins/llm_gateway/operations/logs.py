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
may not). So once a process serves (``write_in_background``), lines are formatted where they
are logged (the request id is a context variable) and written by a thread of their own, in batches; the
zygote, which forks workers and must not run threads, keeps writing synchronously.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
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
FLUSH_WAIT_S = 5.0  # how long flush (logging.shutdown at exit) waits for the writer


class BackgroundStreamHandler(logging.StreamHandler):
    """A StreamHandler whose writes, once ``start`` is called in a process, happen on a writer thread: the
    event loop only formats and queues. ``flush`` waits until what was queued is written (logging.shutdown,
    tests). A fork leaves the thread behind: the child writes synchronously until it calls ``start`` itself."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._queue: queue.Queue[str] | None = None
        self._pid = 0

    def start(self) -> None:
        if self._queue is not None and self._pid == os.getpid():
            return
        self._queue, self._pid = queue.Queue(BACKLOG_LINES), os.getpid()
        threading.Thread(target=self._write_lines, args=(self._queue,), name="llm_gateway.log-writer",
                         daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        if self._queue is None or self._pid != os.getpid():
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._queue.put(line)

    def _write_lines(self, lines: queue.Queue[str]) -> None:
        while True:
            batch = [lines.get()]
            while len(batch) < 1000:
                try:
                    batch.append(lines.get_nowait())
                except queue.Empty:
                    break
            try:
                self.stream.write("\n".join(batch) + "\n")
                self.stream.flush()
            except Exception:  # a closed stderr: nothing to write to, as with logging's own handler
                pass
            for _ in batch:
                lines.task_done()

    def flush(self, timeout: float = FLUSH_WAIT_S) -> None:
        """Wait until the queued lines are written, at most ``timeout`` (a reader that stopped reading the
        pipe must not keep a stopping process alive)."""
        if self._queue is not None and self._pid == os.getpid():
            lines, deadline = self._queue, time.monotonic() + timeout
            with lines.all_tasks_done:
                while lines.unfinished_tasks and (left := deadline - time.monotonic()) > 0:
                    lines.all_tasks_done.wait(left)
        super().flush()


def write_in_background() -> None:
    """This process serves now: its log lines are written off the event loop (see the module docstring)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundStreamHandler):
            handler.start()


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """The root logger writes to stderr, as JSON unless ``LLM_GATEWAY_LOG_FORMAT=text``; Python's warnings and
    exceptions nobody caught (in any thread) become log lines too, rather than multi-line text."""
    level = (level or os.environ.get("LLM_GATEWAY_LOG_LEVEL") or "INFO").upper()
    fmt = (fmt or os.environ.get("LLM_GATEWAY_LOG_FORMAT") or "json").lower()
    handler = BackgroundStreamHandler(sys.stderr)
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
