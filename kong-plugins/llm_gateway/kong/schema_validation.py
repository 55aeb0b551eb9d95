"""Kong's schema validation, the part our plugin schema uses, so a kong.yml can be checked without Kong.

``kong config parse`` cannot check it on Kong 3.9 whenever an external plugin server is configured (it crashes
in ``kong/runloop/plugin_servers/init.lua``, Kong/kong#7583), and ``kong start`` checks it only when Kong
starts. Semantics and messages follow ``kong/db/schema/init.lua`` (3.9.1): unknown fields are refused,
``required`` means present and not null, strings are non-empty unless ``len_min`` says otherwise, a reference in
a ``referenceable`` string skips the other checks (Kong resolves it later), defaults fill absent fields. The
real-Kong tests hold these messages against the real thing (``kong start`` with a bad kong.yml).
"""

from __future__ import annotations

import re
from typing import Any

VAULT_REFERENCE = re.compile(r"^\{vault://[^}]+\}$")


class Invalid(str):
    """A validation message (a str subclass, so error tables compare equal to plain strings)."""


def _type_error(field: dict[str, Any], value: Any) -> Invalid | None:
    kind = field["type"]
    if kind == "string" and not isinstance(value, str):
        return Invalid("expected a string")
    if kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        return Invalid("expected an integer")
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
        return Invalid("expected a number")
    if kind == "boolean" and not isinstance(value, bool):
        return Invalid("expected a boolean")
    if kind in ("array", "set") and not isinstance(value, list):
        return Invalid("expected an array")
    if kind in ("record", "map") and not isinstance(value, dict):
        return Invalid(f"expected a {kind}")
    return None


def _validate_value(field: dict[str, Any], value: Any) -> Any:
    """The value with defaults filled, an Invalid message, or {"@errors": ...} for a record or array."""
    if (err := _type_error(field, value)) is not None:
        return err
    kind = field["type"]
    if kind == "string":
        if field.get("referenceable") and VAULT_REFERENCE.match(value):
            return value
        if len(value) < field.get("len_min", 1):
            return Invalid(f"length must be at least {field.get('len_min', 1)}")
        if "starts_with" in field and not value.startswith(field["starts_with"]):
            return Invalid(f"should start with: {field['starts_with']}")
        if "match" in field and not re.search(field["match"], value):
            return Invalid(f"invalid value: {value}")
        if "one_of" in field and value not in field["one_of"]:
            return Invalid(f"expected one of: {', '.join(field['one_of'])}")
    if kind in ("integer", "number"):
        if "between" in field and not field["between"][0] <= value <= field["between"][1]:
            lo, hi = field["between"]
            return Invalid(f"value should be between {lo} and {hi}")
        if "gt" in field and not value > field["gt"]:
            return Invalid(f"value must be greater than {field['gt']}")
    if kind == "array":
        if len(value) < field.get("len_min", 0):
            return Invalid(f"length must be at least {field['len_min']}")
        out, errors = [], {}
        for i, element in enumerate(value):
            checked = _validate_value(field["elements"], element)
            if isinstance(checked, Invalid) or _is_errors(checked):
                errors[i + 1] = checked["@errors"] if _is_errors(checked) else checked  # Lua indexes from 1
            out.append(checked)
        return {"@errors": errors} if errors else out
    if kind == "record":
        return validate_record(field["fields"], value, field.get("entity_checks", ()))
    return value


def _nonempty(value: Any) -> bool:
    return value not in (None, "", [], {})


def _entity_errors(checks: Any, value: dict[str, Any]) -> list[Invalid]:
    """The entity checks our schema uses (Schema.entity_checkers), with Kong's messages."""
    errors = []
    for check in checks:
        (name, fields), = check.items()
        present = [f for f in fields if _nonempty(value.get(f))]
        quoted = ", ".join(f"'{f}'" for f in fields)
        if name == "at_least_one_of" and not present:
            errors.append(Invalid(f"at least one of these fields must be non-empty: {quoted}"))
        elif name == "mutually_exclusive" and len(present) > 1:
            errors.append(Invalid(f"only one or none of these fields must be set: {quoted}"))
        elif name not in ("at_least_one_of", "mutually_exclusive"):
            raise NotImplementedError(f"entity check {name}")
    return errors


def _is_errors(value: Any) -> bool:
    return isinstance(value, dict) and "@errors" in value


def validate_record(fields: list[dict[str, Any]], value: dict[str, Any], checks: Any = ()) -> Any:
    """Validate a record; returns the filled record or {"@errors": {field: message}} (entity checks' messages
    under "@entity", as Kong puts them)."""
    known = {name: spec for f in fields for name, spec in f.items()}
    errors: dict[str, Any] = {name: Invalid("unknown field") for name in value if name not in known}
    out: dict[str, Any] = {}
    for name, spec in known.items():
        present = value.get(name)
        if present is None:
            if "default" in spec:
                out[name] = spec["default"]
            elif spec.get("required"):
                errors[name] = Invalid("required field missing")
            else:
                out[name] = None
            continue
        checked = _validate_value(spec, present)
        if isinstance(checked, Invalid):
            errors[name] = checked
        elif _is_errors(checked):
            errors[name] = checked["@errors"]
        else:
            out[name] = checked
    if entity := _entity_errors(checks, value):
        errors["@entity"] = entity
    return {"@errors": errors} if errors else out


def validate_plugin_config(schema: dict[str, Any], config: dict[str, Any]) -> tuple[dict | None, dict | None]:
    """(filled config, None) when Kong would accept ``config``; (None, errors) when it would refuse it."""
    config_field = next(f["config"] for f in schema["fields"] if "config" in f)
    checked = validate_record(config_field["fields"], config)
    if _is_errors(checked):
        return None, checked["@errors"]
    return checked, None
