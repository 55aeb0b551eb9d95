"""OpenAI's published OpenAPI document as JSON Schema validators, for the conformance tests.

The spec is read from ``../shared/specs/openai-openapi.yaml`` (or ``$OPENAI_OPENAPI_SPEC``), never copied into
this repository; tests skip with a reason when it is absent. It is OpenAPI 3.1 but still marks many fields
with 3.0's ``nullable: true``, which JSON Schema ignores: ``nullable`` is turned into "or null" here, so a
field the schema declares nullable may be null and a field it requires must be present.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest

SPEC_PATHS = [Path(os.environ["OPENAI_OPENAPI_SPEC"])] if os.environ.get("OPENAI_OPENAPI_SPEC") else []
SPEC_PATHS += [Path(__file__).resolve().parents[2] / "shared" / "specs" / "openai-openapi.yaml",
               Path("/work/shared/specs/openai-openapi.yaml")]


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str) and not any(k in out for k in ("$ref", "allOf", "anyOf", "oneOf")):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@functools.lru_cache(maxsize=1)
def spec() -> dict[str, Any] | None:
    import yaml

    for path in SPEC_PATHS:
        if path.is_file():
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            with path.open() as f:
                return _nullable(yaml.load(f, Loader=loader))
    return None


def require_spec() -> dict[str, Any]:
    document = spec()
    if document is None:
        pytest.skip(f"OpenAI's OpenAPI spec is not at {', '.join(map(str, SPEC_PATHS))}")
    return document


@functools.lru_cache(maxsize=64)
def validator(name: str) -> Any:
    """A validator for ``#/components/schemas/<name>``, resolving $refs inside the whole document."""
    import jsonschema

    document = require_spec()
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    cls = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    return cls(schema)


def assert_valid(name: str, instance: Any) -> None:
    """Fail with every violation (path and message) when ``instance`` does not match the named schema."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        details = "\n".join(f"  at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}"
                            for e in errors[:10])
        raise AssertionError(f"not a valid {name}:\n{details}\ninstance: {str(instance)[:1500]}")


def request_properties() -> dict[str, Any]:
    """Every request field of CreateChatCompletionRequest (through its allOf), with its schema."""
    schemas = require_spec()["components"]["schemas"]

    def props(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return props(schemas[node["$ref"].rsplit("/", 1)[-1]])
        out: dict[str, Any] = {}
        for part in node.get("allOf", ()):
            out.update(props(part))
        out.update(node.get("properties", {}))
        return out

    return props(schemas["CreateChatCompletionRequest"])


def assert_valid_property(name: str, value: Any) -> None:
    """``value`` is what CreateChatCompletionRequest allows for the field ``name``."""
    import jsonschema

    document = require_spec()
    schema = {**request_properties()[name], "components": document["components"]}
    cls = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    errors = list(cls(schema).iter_errors(value))
    assert not errors, f"sample for {name} is not valid per the spec: {errors[0].message[:300]}"
