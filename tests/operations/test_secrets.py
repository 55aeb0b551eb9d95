"""No secret ever appears in a response, a log line, a metric or a usage record: provider keys, consumer
credentials, tickets.

Runs the error paths most likely to leak (provider auth failure, unreachable provider, provider 400 echoing
input, bypass attempts), then scans what clients got, everything the plugin server logged in this test
session (one JSON object per line), its Prometheus metrics and health reports, and the Redis usage stream.
conftest runs this module last, so the scan covers the whole run.
"""

from __future__ import annotations

import json
import re

import httpx
import redis

from conftest import ALICE_KEY, BOB_KEY, PROVIDER_KEY, REDIS_URL, USAGE_STREAM, WRONG_PROVIDER_KEY
from kong_harness import KongHarness, PluginServerProcess

HELLO = [{"role": "user", "content": "hello"}]
SECRETS = {"provider key": PROVIDER_KEY, "wrong provider key": WRONG_PROVIDER_KEY,
           "alice's credential": ALICE_KEY, "bob's credential": BOB_KEY}


def test_no_secret_in_responses_or_logs(kong: KongHarness, plugin_server: PluginServerProcess) -> None:
    seen: list[str] = []
    for model in ("wrong-key", "provider-down", "provider-400", "rate-limited", "demo", "no-such-model"):
        for stream in (False, True):
            response = httpx.post(f"{kong.url}/v1/chat/completions", timeout=30, headers={"apikey": ALICE_KEY},
                                  json={"model": model, "messages": HELLO, "stream": stream})
            seen.append(json.dumps(dict(response.headers)) + response.text)
    # a request straight to the listener, with the client's own key in every header it can think of
    for ticket in ({}, {"X-LLM-Gateway-Ticket": "v3.forged"}):  # no ticket (retryable), a forged one (refused)
        bypass = httpx.post(f"http://{plugin_server.listen}/v1/chat/completions", json={"model": "demo"},
                            headers={"apikey": BOB_KEY, "Authorization": f"Bearer {BOB_KEY}", **ticket})
        seen.append(json.dumps(dict(bypass.headers)) + bypass.text)
    log = plugin_server.stderr_text()
    seen.append(httpx.get(f"http://{plugin_server.metrics}/metrics", timeout=10).text)
    for health in ("live", "ready"):  # the health reports name Redis by host, never by URL
        seen.append(httpx.get(f"http://{plugin_server.metrics}/health/{health}", timeout=10).text)
    records = [b"".join(fields.values()).decode() for _, fields in redis.Redis.from_url(REDIS_URL).xrange(USAGE_STREAM)]
    assert records, "the usage stream should hold this run's records"
    seen.extend(records)
    assert "refused a request without a valid ticket" in log  # the log did record the events above
    for name, secret in SECRETS.items():
        assert not any(secret in text for text in seen), f"{name} leaked into a response, a metric or a record"
        assert secret not in log, f"{name} leaked into the plugin server's log"
    assert not re.search(r"v2\.[0-9a-f]{16}\.", log), "a hand-off ticket was logged"


def test_every_line_the_plugin_server_wrote_in_the_whole_run_is_one_json_object(
        plugin_server: PluginServerProcess) -> None:
    """Run last (as this module is): every error path of the session has been through the log by now, LiteLLM's
    included (its own handlers are replaced by ours at start)."""
    for line in plugin_server.stderr_text().splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict) and {"ts", "level", "logger"} <= entry.keys(), line
