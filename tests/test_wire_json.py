"""wire_json.py: orjson's speed, the standard library's acceptance."""

from __future__ import annotations

import json
import math

import pytest

from llm_gateway import wire_json


def test_reads_and_writes_what_the_standard_library_does() -> None:
    chunk = {"id": "c", "choices": [{"delta": {"content": "é ✓"}, "finish_reason": None}], "usage": None}
    raw = json.dumps(chunk).encode()
    assert wire_json.loads(raw) == chunk
    assert json.loads(wire_json.dumps(chunk)) == chunk


def test_what_orjson_refuses_falls_back() -> None:
    big = 2**70  # beyond 64 bits: orjson refuses to read and to write it
    assert wire_json.loads(f'{{"n": {big}}}'.encode()) == {"n": big}
    assert json.loads(wire_json.dumps({"n": big})) == {"n": big}
    assert math.isnan(wire_json.loads(b'{"x": NaN}')["x"])  # read as before: the standard library reads it


def test_a_parse_constant_still_refuses() -> None:
    def refuse(name: str) -> None:
        raise ValueError(name)

    with pytest.raises(ValueError):
        wire_json.loads(b'{"x": NaN}', refuse)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1,}', b"\xff\xfe", b"data: {}"])
def test_not_json_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        wire_json.loads(raw)
