"""Request bodies with a Content-Encoding (issue 10, item 7): Kong forwards them compressed and mints the ticket
over the compressed bytes; the listener verifies those, then decodes gzip/deflate itself, bounded by the route's
max_body_bytes, and answers every other coding with OpenAI's error JSON.

End to end through the Kong-side harness and the real plugin server, plus content_encoding's decoder directly.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import httpx
import pytest

from conftest import ALICE_KEY, MAX_BODY_BYTES, gateway_config, route_to, wait_for_record
from kong_harness import KongHarness, PluginServerProcess
from llm_gateway.errors import GatewayError
from llm_gateway.listener import content_encoding
from mock_provider import MockProvider

HELLO = [{"role": "user", "content": "Say hello to the gateway"}]
BODY = json.dumps({"model": "gpt-mock", "messages": HELLO}).encode()


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def post(kong: KongHarness, body: bytes, encoding: str | None) -> httpx.Response:
    headers = {"apikey": ALICE_KEY, "Content-Type": "application/json"}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return httpx.post(f"{kong.url}/v1/chat/completions", content=body, headers=headers, timeout=15)


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


@pytest.mark.parametrize(("encoding", "encode"), [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("GZIP", gzip.compress),
    ("deflate", zlib.compress),  # RFC 9110's deflate: zlib-wrapped
    ("deflate", raw_deflate),  # what some clients send instead
    ("gzip, deflate", lambda b: zlib.compress(gzip.compress(b))),
    ("identity", lambda b: b),
])
def test_compressed_bodies_are_accepted(kong: KongHarness, encoding: str, encode) -> None:  # type: ignore[no-untyped-def]
    response = post(kong, encode(BODY), encoding)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello from mock-gpt: Say hello to the gateway"


def test_compressed_stream(kong: KongHarness) -> None:
    body = json.dumps({"model": "gpt-mock", "messages": HELLO, "stream": True}).encode()
    response = post(kong, gzip.compress(body), "gzip")
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "snappy", "gzip, br"])
def test_unsupported_encodings_are_415(kong: KongHarness, encoding: str) -> None:
    error = error_of(post(kong, BODY, encoding), 415, "unsupported_media_type")
    assert error["param"] == "Content-Encoding"
    assert "gzip" in error["message"] and "deflate" in error["message"]
    assert "Brotli" not in error["message"]


def test_encoding_echo_is_bounded(kong: KongHarness) -> None:
    error = error_of(post(kong, BODY, "x" * 5000), 415, "unsupported_media_type")
    assert len(error["message"]) < 300


@pytest.mark.parametrize(("encoding", "body"), [
    ("gzip", BODY),  # labelled gzip, not gzip
    ("deflate", b"\x00\x01\x02 definitely not deflate"),
    ("gzip", gzip.compress(BODY)[:-12]),  # truncated
    ("gzip", gzip.compress(BODY) + b"trailing garbage"),
])
def test_malformed_compressed_bodies_are_400(kong: KongHarness, encoding: str, body: bytes) -> None:
    error = error_of(post(kong, body, encoding), 400, "invalid_content_encoding")
    assert error["param"] == "Content-Encoding" and encoding in error["message"]


def _gzip_bomb(decoded_mib: int) -> bytes:
    """A gzip body holding ``decoded_mib`` MiB of JSON padding, compressed a MiB at a time (never held whole)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(b'{"model": "gpt-mock", "messages": [], "pad": "')]
    spaces = b" " * (1 << 20)
    parts += [packer.compress(spaces) for _ in range(decoded_mib)]
    return b"".join([*parts, packer.flush()])


def test_decompression_bomb_is_413_and_bounded(plugin_server: PluginServerProcess,
                                              mock_provider: MockProvider) -> None:
    """A 1 MB gzip body holding 1 GiB, on a route whose limit is 1 MiB: refused once the output passes the
    limit, never decompressed whole. The server's first requests grow it by tens of MB whatever they carry
    (LiteLLM's first call, a thread's malloc arena), so the bound is far from that and far under a whole decode."""
    limit = 1 << 20
    bomb = _gzip_bomb(1024)
    assert len(bomb) < limit  # the compressed body itself fits the route's limit

    def peak_rss_kb() -> int:
        status = Path(f"/proc/{plugin_server.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])

    with route_to(plugin_server, dict(gateway_config(mock_provider), max_body_bytes=limit)) as roomy:
        before = peak_rss_kb()
        for _ in range(3):
            error = error_of(post(roomy, bomb, "gzip"), 413, "request_too_large")
            assert str(limit) in error["message"]
    assert peak_rss_kb() - before < 256 * 1024, "the bomb was decompressed past the limit"


def test_compressed_body_within_limit_only_after_decoding(kong: KongHarness) -> None:
    """max_body_bytes bounds the decoded body: a small gzip body that decodes past it is 413."""
    padded = json.dumps({"model": "gpt-mock", "messages": HELLO, "user": "u" * MAX_BODY_BYTES}).encode()
    error_of(post(kong, gzip.compress(padded), "gzip"), 413, "request_too_large")


def test_compressed_request_is_recorded_like_any_other(kong: KongHarness, plugin_server: PluginServerProcess) -> None:
    ok = post(kong, gzip.compress(BODY), "gzip")
    record = wait_for_record(plugin_server, ok.headers["X-Request-ID"])
    assert record["status"] == 200 and record["alias"] == "gpt-mock"


# -- the decoder ------------------------------------------------------------------------------------------
def test_decoder_limit_is_exact() -> None:
    data = b"a" * 1000
    assert content_encoding.decode_one(gzip.compress(data), "gzip", 1000) == data
    with pytest.raises(GatewayError) as caught:
        content_encoding.decode_one(gzip.compress(data), "gzip", 999)
    assert caught.value.status == 413


def test_decoder_reads_every_gzip_member() -> None:
    assert content_encoding.decode_one(gzip.compress(b"one ") + gzip.compress(b"two"), "gzip", 100) == b"one two"


def test_decoder_stops_early_on_a_bomb() -> None:
    bomb = zlib.compress(b"\0" * (200 * 1024 * 1024), 9)  # ~200 KB → 200 MB
    with pytest.raises(GatewayError) as caught:
        content_encoding.decode_one(bomb, "deflate", 1024 * 1024)
    assert caught.value.status == 413


def test_header_parsing() -> None:
    assert content_encoding.encodings(None) == []
    assert content_encoding.encodings("identity") == []
    assert content_encoding.encodings(" GZip , deflate ") == ["gzip", "deflate"]
    with pytest.raises(GatewayError) as caught:
        content_encoding.encodings("gzip, " * 5)
    assert caught.value.status == 415


async def test_large_decodes_leave_the_event_loop() -> None:
    """Beyond INLINE_LIMIT of possible output, decoding runs in a worker thread: the loop keeps turning."""
    import asyncio

    data = b"x" * (8 * 1024 * 1024)
    packed = gzip.compress(data, 1)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    assert await content_encoding.decode(packed, "gzip", len(data)) == data
    task.cancel()
    assert ticks > 1, "the decode ran on the event loop"
