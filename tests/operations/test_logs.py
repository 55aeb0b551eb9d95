"""The plugin server's log (``operations/logs.py``): one JSON object per line, the request id where there is one,
levels an operator can filter, and the usage record as its own event."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from conftest import ALICE_KEY, free_port, usage_records, wait_for_log
from kong_harness import KongHarness, PluginServerProcess, start_plugin_server
from llm_gateway.operations import logs

HELLO = [{"role": "user", "content": "hello"}]


def _entries(server: PluginServerProcess) -> list[dict]:
    lines = server.stderr_text().splitlines()
    assert lines
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line, not only ours: LiteLLM's and Python's warnings too
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger"} <= entry.keys(), line
        assert entry["ts"].endswith("Z") and entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert "message" in entry or entry.get("event") == "usage", line
        entries.append(entry)
    return entries


def test_every_line_is_one_json_object_and_request_lines_carry_the_request_id(
        kong: KongHarness, plugin_server: PluginServerProcess) -> None:
    response = httpx.post(f"{kong.url}/v1/chat/completions", headers={"apikey": ALICE_KEY}, timeout=30,
                          json={"model": "gpt-mock", "messages": HELLO})
    assert response.status_code == 200
    request_id = response.headers["X-Request-ID"]
    marker = "bypass-" + secrets.token_hex(6)
    bypass = httpx.post(f"http://{plugin_server.listen}/v1/chat/completions", json={"model": "demo"},
                        headers={"X-Kong-Request-Id": marker, "X-LLM-Gateway-Ticket": "v3.forged"}, timeout=10)
    assert bypass.status_code == 403
    usage_records(plugin_server)[request_id]  # the record is there, parsed as its own event
    wait_for_log(plugin_server, marker)
    entries = _entries(plugin_server)
    refused = [e for e in entries if e.get("request_id") == marker]
    assert refused and refused[0]["level"] == "WARNING" and refused[0]["logger"] == "llm_gateway.listener"
    assert "without a valid ticket" in refused[0]["message"]
    usage = [e for e in entries if e.get("event") == "usage" and e["request_id"] == request_id]
    assert len(usage) == 1 and usage[0]["logger"] == "llm_gateway.usage" and usage[0]["level"] == "INFO"
    assert usage[0]["alias"] == "gpt-mock" and usage[0]["status"] == 200 and usage[0]["total_tokens"] > 0
    assert not [e for e in entries if "request_id" in e and e.get("event") != "usage"
                and e["logger"] in ("llm_gateway", "llm_gateway.handover")], "startup lines have no request"


def test_the_level_filters_and_warnings_still_show(tmp_path: Path) -> None:
    server = start_plugin_server(str(tmp_path / "s.sock"), f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                 env={"LLM_GATEWAY_LOG_LEVEL": "warning", "LLM_GATEWAY_METRICS_LISTEN": "off"})
    try:
        httpx.post(f"http://{server.listen}/v1/chat/completions", json={"model": "demo"},
                   headers={"X-LLM-Gateway-Ticket": "v3.forged"}, timeout=10)
        wait_for_log(server, "without a valid ticket")
        entries = _entries(server)
        assert not [e for e in entries if e["level"] in ("DEBUG", "INFO")], entries[:3]
        assert any(e["level"] == "WARNING" and "without a valid ticket" in e["message"] for e in entries)
    finally:
        server.stop()


def _format(record: logging.LogRecord) -> dict:
    line = logs.JSONFormatter().format(record)
    assert "\n" not in line
    return json.loads(line)


def test_an_exception_is_one_line_and_the_usage_record_is_spliced_whole() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("llm_gateway.listener", logging.ERROR, __file__, 1, "request %s failed", ("r1",),
                                   sys.exc_info())
    token = logs.request_id.set("req-123")
    try:
        entry = _format(failed)
    finally:
        logs.request_id.reset(token)
    assert entry["message"] == "request r1 failed" and entry["request_id"] == "req-123"
    assert entry["exception"].startswith("Traceback") and "ValueError: boom" in entry["exception"]
    record = {"request_id": "r2", "consumer": 'o"hara\n', "total_tokens": 3, "cost_usd": None}
    usage = logging.LogRecord(logs.USAGE_LOGGER, logging.INFO, __file__, 1, json.dumps(record), (), None)
    entry = _format(usage)
    assert entry.pop("event") == "usage" and entry.pop("logger") == logs.USAGE_LOGGER and entry.pop("ts")
    assert entry.pop("level") == "INFO" and entry == record
    assert "request_id" not in _format(logging.LogRecord("x", logging.INFO, __file__, 1, "no request", (), None))


class _Pipe(io.StringIO):
    """A stderr whose writes can be held, as a pipe whose reader (nginx's worker 0) is busy elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.open.set()
        self.writing = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        self.open.wait()
        return super().write(text)


def _logger(name: str, stream: Any) -> logging.Logger:
    """A logger of its own (not the root the rest of the test run logs to), writing JSON lines to ``stream``."""
    logger = logging.getLogger(f"llm_gateway.test.{name}.{secrets.token_hex(4)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JSONFormatter())
    logger.addHandler(handler)
    return logger


def _messages(text: str) -> list[str]:
    return [json.loads(line)["message"] for line in text.splitlines()]


def test_once_serving_a_line_never_waits_for_the_pipe_and_none_is_lost() -> None:
    pipe = _Pipe()
    logger = _logger("held", pipe)
    logs.write_in_background(logger)
    try:
        pipe.open.clear()  # the reader stops reading
        logger.info("first")
        assert pipe.writing.wait(5)
        started = time.monotonic()
        for n in range(200):
            logger.info("line %d", n)  # queued behind the held write: the caller goes on
        assert time.monotonic() - started < 1.0
    finally:
        logs.stop_writing_in_background(timeout=0.2)  # a stopped reader does not keep a stopping process alive
    assert time.monotonic() - started < 2.0
    pipe.open.set()
    deadline = time.monotonic() + 5
    while len(pipe.getvalue().splitlines()) < 201 and time.monotonic() < deadline:
        time.sleep(0.01)
    # every line, in order, each one line
    assert _messages(pipe.getvalue()) == ["first", *(f"line {n}" for n in range(200))]


def test_before_start_and_in_a_forked_child_lines_are_written_at_once(tmp_path: Path) -> None:
    """The zygote never starts the writer (it must not run threads when it forks); a child of a process that
    did writes synchronously until it starts its own."""
    pipe = _Pipe()
    logger = _logger("sync", pipe)
    logger.info("synchronous")
    assert _messages(pipe.getvalue()) == ["synchronous"]
    out = tmp_path / "child.log"
    with out.open("w") as stream:
        forked = _logger("fork", stream)
        logs.write_in_background(forked)
        try:
            pid = os.fork()
            if pid == 0:  # the child: its writer thread stayed in the parent
                forked.info("after fork")
                stream.flush()
                os._exit(0 if "after fork" in out.read_text() else 1)
            _, status = os.waitpid(pid, 0)
        finally:
            logs.stop_writing_in_background()
    assert os.waitstatus_to_exitcode(status) == 0, "the child's line was not written at once"
    assert _messages(out.read_text()) == ["after fork"]
