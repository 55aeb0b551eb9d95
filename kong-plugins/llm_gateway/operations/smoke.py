"""``kong-llm-gateway smoke``: the first command a new user runs, through Kong, to see that the gateway works;
and ``kong-llm-gateway health``, the readiness probe the image's HEALTHCHECK runs.

``smoke`` sends one chat request and one stream through Kong's proxy (so key-auth, rate-limiting and the
plugin all run), prints the answer as it streams, then the usage, the cost and the headers that say what
happened (provider, deployment, attempts, fallback). Any failure ends it with exit status 1 and one readable
reason on stderr: Kong down, a refused key (401), no such route or model (404), the plugin server not
answering (Kong's 500/502/503 while it starts or after it died), a budget or rate limit (429), a provider
failing. The consumer's key is sent, never printed.

Standard library only (urllib), so it runs with nothing but the package installed and starts at once.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

HEADERS_SHOWN = ("X-Request-ID", "X-LLM-Provider", "X-LLM-Model", "X-LLM-Deployment", "X-LLM-Attempts",
                 "X-LLM-Fallback", "X-LLM-Complexity", "X-LLM-Prompt-Tokens", "X-LLM-Completion-Tokens",
                 "X-LLM-Total-Tokens", "X-LLM-Cost-USD", "X-LLM-Usage-Estimated", "X-RateLimit-Remaining-Tokens",
                 "X-RateLimit-Remaining-Minute", "X-Kong-Upstream-Latency", "X-Kong-Proxy-Latency")
PROMPT = "Say hello to the platform team in one short sentence."


class SmokeFailure(Exception):
    """One readable reason the smoke test failed."""


def default_health_url() -> str:
    """The readiness URL of the plugin server on this host, from LLM_GATEWAY_METRICS_LISTEN (as ``serve``)."""
    listen = os.environ.get("LLM_GATEWAY_METRICS_LISTEN", "127.0.0.1:9542")
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/health/ready"


def _error_of(body: bytes) -> dict[str, Any]:
    """The OpenAI error object of a refusal (Kong's own refusals have one too: error_template_json)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _reason(status: int, body: bytes, headers: Any, url: str, model: str) -> str:
    """What a refusal means, in a sentence an operator can act on."""
    error = _error_of(body)
    message = str(error.get("message") or body[:200].decode(errors="replace").strip() or "no body")
    code = error.get("code")
    said = f"{status}{f' {code}' if code else ''}: {message}"
    if status == 401:
        return f"Kong refused the key ({said}). Use a consumer key from kong.yml's consumers, e.g. demo-key-alice."
    if status == 403:
        return f"refused ({said})."
    if status == 404 and code == "model_not_found":
        return f"the route has no model '{model}' ({said}). Pass --model with an alias of the route's config."
    if status == 404:
        return (f"no Kong route answers POST {url} ({said}). Is --url Kong's proxy (port 8000), with the route "
                "of kong.yml?")
    if status == 429:
        retry = headers.get("Retry-After")
        return f"rate-limited or over budget ({said}){f'; retry after {retry} s' if retry else ''}."
    kongs_own = not error or error.get("type") == "gateway_error"  # Kong's error_template_json, not the plugin's
    if (status >= 500 and kongs_own) or code in ("gateway_restarting", "config_reloaded"):
        return (f"Kong could not get an answer from the llm-gateway plugin server ({said}). It is still "
                "starting (LiteLLM takes seconds to import) or it is down: check its readiness "
                "(kong-llm-gateway health) and Kong's error log.")
    if status == 504:
        return f"the provider did not answer in time ({said})."
    if status >= 500:
        return f"the provider failed ({said}); the gateway's headers and usage record say which deployment."
    return f"the gateway answered {said}"


def _post(url: str, key: str, body: dict[str, Any], timeout: float) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream", "apikey": key,
        "User-Agent": "kong-llm-gateway-smoke"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise SmokeFailure(_reason(exc.code, exc.read(), exc.headers, url, body["model"])) from None
    except (urllib.error.URLError, OSError) as exc:
        cause = getattr(exc, "reason", exc)
        if isinstance(cause, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(cause, socket.timeout | TimeoutError):
            why = f"no answer within {timeout:g} s"
        else:
            why = str(cause) or type(cause).__name__
        raise SmokeFailure(f"cannot reach Kong at {url}: {why}. Is Kong running (docker compose -f "
                           "docker/compose.yml ps), and is --url its proxy address?") from None


def _show_headers(headers: Any, out: TextIO) -> None:
    for name in HEADERS_SHOWN:
        value = headers.get(name)
        if value is not None:
            out.write(f"  {name}: {value}\n")


def _usage_line(usage: dict[str, Any] | None, cost: Any) -> str:
    if not usage:
        return "  usage: not reported"
    line = (f"  usage: {usage.get('prompt_tokens', '?')} prompt + {usage.get('completion_tokens', '?')} completion "
            f"= {usage.get('total_tokens', '?')} tokens")
    if cost is not None:
        line += f", cost ${float(cost):.8f}"
    return line


def _json_round(url: str, key: str, model: str, timeout: float, out: TextIO) -> None:
    out.write(f"POST {url} (model {model})\n")
    with _post(url, key, {"model": model, "messages": [{"role": "user", "content": PROMPT}]}, timeout) as resp:
        raw = resp.read()
        headers = resp.headers
    try:
        answer = json.loads(raw)
        text = answer["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise SmokeFailure(f"the answer is not a chat completion: {raw[:200]!r}") from None
    out.write(f"  answer: {text}\n")
    out.write(_usage_line(answer.get("usage"), headers.get("X-LLM-Cost-USD")) + "\n")
    _show_headers(headers, out)


def _events(resp: Any) -> Iterator[str]:
    """The data of each SSE event, as it arrives."""
    while True:
        line = resp.readline()
        if not line:
            return
        text = line.decode(errors="replace").rstrip("\r\n")
        if text.startswith("data:"):
            yield text[5:].strip()


def _stream_round(url: str, key: str, model: str, timeout: float, out: TextIO) -> None:
    out.write(f"POST {url} (model {model}, stream)\n  stream: ")
    out.flush()
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPT}]}
    usage, done, started, first = None, False, time.monotonic(), None
    with _post(url, key, body, timeout) as resp:
        headers = resp.headers
        if not headers.get("Content-Type", "").startswith("text/event-stream"):
            raise SmokeFailure(f"the stream answered {headers.get('Content-Type')!r}, not text/event-stream")
        for data in _events(resp):
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise SmokeFailure(f"the stream sent an event that is not JSON: {data[:200]!r}") from None
            if "error" in chunk:
                error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                raise SmokeFailure(f"the stream ended with an error event ({error.get('code')}: "
                                   f"{error.get('message')})")
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.monotonic()
                    out.write(piece)
                    out.flush()
            usage = chunk.get("usage") or usage
    out.write("\n")
    if not done:
        raise SmokeFailure("the stream ended without its final [DONE] event (cut by the provider or the network)")
    if first is not None:
        out.write(f"  time to first token: {(first - started) * 1000:.0f} ms\n")
    out.write(_usage_line(usage, (usage or {}).get("cost_usd")) + "\n")
    _show_headers(headers, out)


def ready(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    """(ready?, why) from the plugin server's readiness endpoint."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return True, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            report = json.loads(body)
            failing = [f"{name} ({check.get('detail')})" for name, check in report.get("checks", {}).items()
                       if not check.get("ok")]
            return False, f"{report.get('status')} in phase {report.get('phase')}: " + ", ".join(failing)
        except (ValueError, AttributeError):
            return False, f"{exc.code}: {body[:200].decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"no answer from {url} ({getattr(exc, 'reason', exc)})"


def run(url: str, key: str, model: str = "demo", *, timeout: float = 60.0, ready_url: str | None = None,
        out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The smoke test: 0 when both rounds worked, 1 (with the reason on ``err``) otherwise."""
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    try:
        if ready_url:
            ok, why = ready(ready_url)
            if not ok:
                raise SmokeFailure(f"the llm-gateway plugin server is not ready: {why}")
        _json_round(endpoint, key, model, timeout, out)
        _stream_round(endpoint, key, model, timeout, out)
    except SmokeFailure as failure:
        out.flush()
        err.write(f"smoke test FAILED: {failure}\n")
        return 1
    out.write(f"OK: Kong at {url} answered a chat completion and a stream through llm-gateway.\n")
    return 0


def health(url: str | None = None) -> int:
    """``kong-llm-gateway health``: exit 0 when the plugin server is ready, else 1 with the reason."""
    ok, why = ready(url or default_health_url())
    print("ready" if ok else f"not ready: {why}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
