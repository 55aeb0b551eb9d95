"""JSON on the hot path (providers' answers and chunks, usage records): orjson, with the standard library
behind it for what orjson refuses.

Every streamed chunk is parsed (usage, text, a malformed stream) and most are re-encoded (the ``usage: null``
OpenAI adds to each chunk once usage is asked for upstream, which the client did not ask for). The standard
library's ``json`` costs ~2.6 µs to parse and ~3.5 µs to encode such a 260-byte chunk; orjson ~0.6 and
~0.2 µs. What orjson refuses but the standard library reads (integers beyond 64 bits, NaN) falls back to the
standard library, so what is accepted is exactly what was accepted before. Client request bodies are not read
here: api/request_body.py's limits are the standard library's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson


def loads(data: bytes | str, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """``data`` parsed; ValueError (or RecursionError) when it is not JSON the standard library would read."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data, parse_constant=parse_constant)


def dumps(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """``value`` as compact UTF-8 JSON bytes; ``default`` turns what JSON has no type for into what it has."""
    try:
        return orjson.dumps(value, default=default)
    except TypeError:  # an integer beyond 64 bits, a key that is not a string: what orjson does not write
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=default).encode()
