"""Reading a request body, the same way on every endpoint: JSON, bounded, one object naming its ``model``, and no
field the endpoint does not know.

Parsing is bounded: the body is at most the route's ``max_body_bytes``, JSON nesting at most ``MAX_NESTING``
levels (LiteLLM's transformations recurse, and deep-copy, tool schemas), integers at most Python's 4,300
digits, and NaN/Infinity (not JSON) are refused, so every input costs time linear in its size. Unknown fields
are refused by name, never dropped: a client that sets a parameter expects it to matter.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from llm_gateway.errors import GatewayError, bad_request

MAX_NESTING = 64  # JSON levels; OpenAI allows 10 levels of nesting in a strict schema


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # NaN, Infinity, -Infinity: Python's json accepts them, JSON does not


def _too_deep(data: Any) -> bool:
    """Whether the parsed body nests more than MAX_NESTING levels (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))
    return False


def load_json(body: bytes) -> Any:
    """The body as JSON, or a 400 that says why not (never Python's own text)."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise bad_request(f"The request body nests JSON more than {MAX_NESTING} levels deep.",
                          code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, NaN/Infinity, integers over 4,300 digits
        reason = "it is not valid JSON"
        if isinstance(exc, json.JSONDecodeError):
            reason = f"it is not valid JSON (line {exc.lineno}, column {exc.colno})"
        elif "digits" in str(exc):
            reason = "it holds an integer with more than 4300 digits"
        elif str(exc) in ("NaN", "Infinity", "-Infinity"):
            reason = f"{exc} is not a JSON value"
        raise bad_request(f"The request body cannot be read: {reason}.", code="invalid_json") from None
    if _too_deep(data):
        raise bad_request(f"The request body nests JSON more than {MAX_NESTING} levels deep.", code="invalid_json")
    return data


def request_object(body: bytes) -> tuple[dict[str, Any], str]:
    """The body as a JSON object, and the alias its ``model`` names; a 400 otherwise."""
    data = load_json(body)
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", param="model")
    return data, model


def refuse_unknown(data: dict[str, Any], known: Collection[str]) -> None:
    """A 400 naming the fields of ``data`` that are not in ``known`` (the first five, cut to 64 characters)."""
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        shown = ", ".join(name[:64] for name in unknown[:5])
        raise GatewayError(400, f"Unrecognized request parameter(s): {shown}.", param=unknown[0][:64],
                           code="unsupported_parameter")
