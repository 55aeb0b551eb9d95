"""Request bodies sent with a ``Content-Encoding``: decoded here, after the ticket check, and never past a limit.

Kong forwards the body as the client sent it, so the listener checks the ticket, reads the raw body (aiohttp's
transparent decompression is off), and only then decodes it. Decoding is bounded: a small compressed body can
expand a thousandfold (a 58 KB gzip body can hold 60 MB), so output stops one byte past the route's
``max_body_bytes`` (413), and a body that could expand to more than ``INLINE_LIMIT`` bytes is decoded in a
worker thread (zlib releases the GIL), not on the event loop.

Supported: ``gzip`` (``x-gzip``; several members are fine) and ``deflate`` (zlib-wrapped, as HTTP specifies,
or raw, as some clients send it), and chains of them. ``br`` and ``zstd`` need libraries this package does not
depend on, so they are refused with 415 like any other encoding, in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import zlib

from llm_gateway.errors import GatewayError

SUPPORTED = ("gzip", "deflate")
ALIASES = {"x-gzip": "gzip"}
MAX_CHAIN = 4  # "gzip, gzip, gzip, ..." is a client trying something, not compressing
MAX_GZIP_MEMBERS = 1024
DEFLATE_MAX_RATIO = 1032  # deflate's best case: one input byte expands to at most ~1032 output bytes
INLINE_LIMIT = 1024 * 1024  # decode on the event loop only when the output cannot exceed this


def _echo(value: str, limit: int = 64) -> str:
    return value if len(value) <= limit else value[:limit] + "…"


def encodings(header: str | None) -> list[str]:
    """The codings a ``Content-Encoding`` header lists, in the order they were applied; 415 for any unsupported."""
    if not header:
        return []
    listed = [ALIASES.get(c, c) for c in (part.strip().lower() for part in header.split(",")) if c]
    listed = [c for c in listed if c != "identity"]
    for coding in listed:
        if coding not in SUPPORTED:
            raise GatewayError(415, f"Content-Encoding '{_echo(coding)}' is not supported: send the body "
                               f"uncompressed, or compressed with {' or '.join(SUPPORTED)}.",
                               param="Content-Encoding", code="unsupported_media_type")
    if len(listed) > MAX_CHAIN:
        raise GatewayError(415, f"Content-Encoding lists {len(listed)} codings; at most {MAX_CHAIN} are accepted.",
                           param="Content-Encoding", code="unsupported_media_type")
    return listed


def _malformed(coding: str) -> GatewayError:
    return GatewayError(400, f"The request body is not valid {coding} data (Content-Encoding: {coding}).",
                        param="Content-Encoding", code="invalid_content_encoding")


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than {limit} bytes once decompressed.",
                        code="request_too_large")


def _inflater(coding: str, data: bytes) -> zlib._Decompress:
    if coding == "gzip":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    # RFC 9110 "deflate" is the zlib format; a zlib header is a CMF byte with method 8 and a check over 2 bytes
    zlib_wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
    return zlib.decompressobj(wbits=zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)


def decode_one(data: bytes, coding: str, limit: int) -> bytes:
    """``data`` decoded from ``coding``; GatewayError 413 as soon as the output passes ``limit`` bytes, 400 when
    ``data`` is not valid (truncated, corrupt, or followed by anything but another gzip member)."""
    out = bytearray()
    pending, members = data, 0
    try:
        while True:
            inflater = _inflater(coding, pending)
            members += 1
            while not inflater.eof:
                chunk = inflater.decompress(pending, limit + 1 - len(out))
                pending = inflater.unconsumed_tail
                out += chunk
                if len(out) > limit:
                    raise _too_large(limit)
                if not chunk and not pending:
                    raise _malformed(coding)  # the input ended before the compressed stream did
            pending = inflater.unused_data
            if not pending:
                return bytes(out)
            if coding != "gzip" or not pending.startswith(b"\x1f\x8b") or members >= MAX_GZIP_MEMBERS:
                raise _malformed(coding)  # trailing bytes after the stream
    except zlib.error:
        raise _malformed(coding) from None


def decode_all(data: bytes, codings: list[str], limit: int) -> bytes:
    """Undo the codings in reverse order of application, each bounded by ``limit``."""
    for coding in reversed(codings):
        data = decode_one(data, coding, limit)
    return data


async def decode(data: bytes, header: str | None, limit: int) -> bytes:
    """The body as the client meant it: ``data`` decoded per its ``Content-Encoding`` header (``data`` itself
    when there is none), at most ``limit`` bytes; large decodes run in a worker thread."""
    codings = encodings(header)
    if not codings:
        return data
    if min(limit, len(data) * DEFLATE_MAX_RATIO ** len(codings)) <= INLINE_LIMIT:
        return decode_all(data, codings, limit)
    return await asyncio.to_thread(decode_all, data, codings, limit)
