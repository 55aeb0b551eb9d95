"""errors.py alone: LiteLLM's exceptions classified once, messages scrubbed, x-should-retry on every error."""

from __future__ import annotations

import litellm
import pytest

from llm_gateway.errors import from_build_exception, from_provider_exception, named_parameters, scrub


def test_scrub_keeps_the_reason_and_drops_litellm_advice_echoes_and_python_text() -> None:
    text = ("litellm.BadRequestError: AnthropicException - messages.0: content must not be empty. To drop "
            "unsupported openai params from the call, set `litellm.drop_params = True`. Set "
            "litellm.modify_params = True to fix. 'int' object has no attribute 'get'. "
            "Received Messages=[{'role': 'user', 'content': [1]}]")
    assert scrub(text) == "messages.0: content must not be empty."
    assert scrub("Image fetch rejected. Add the host to `user_url_allowed_hosts`.") == "Image fetch rejected."
    assert scrub("Traceback (most recent call last):\n  File \"x.py\", line 1") == "no reason given"


def test_unsupported_params_are_named_from_either_of_litellms_phrasings() -> None:
    listed = litellm.UnsupportedParamsError(status_code=400, message="anthropic does not support parameters: "
                                            "['n', 'seed'], for model=claude. To drop these, set drop_params")
    assert named_parameters(listed, {"n": 2, "seed": 1}) == ["n", "seed"]
    prose = litellm.UnsupportedParamsError(status_code=400, message="O-series models don't support "
                                           "temperature=0.2. Only temperature=1 is supported.")
    assert named_parameters(prose, {"temperature": 0.2, "top_p": 1}) == ["temperature"]
    err = from_provider_exception(prose, {"temperature": 0.2})
    assert (err.status, err.code, err.param) == (400, "unsupported_parameter", "temperature")
    assert "litellm" not in err.message.lower() and err.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("exc", [ValueError("bad"), TypeError("'int' object is not iterable"), KeyError("x"),
                                 AttributeError("'int' object has no attribute 'get'"), RecursionError(),
                                 litellm.BadRequestError(message="Invalid Message passed in {'role': 'x'}",
                                                         model="m", llm_provider="anthropic")])
def test_anything_raised_while_building_is_the_clients_400_without_python_text(exc: Exception) -> None:
    err = from_build_exception(exc, {"tools": []})
    assert err.status == 400 and err.code == "invalid_request" and err.headers["x-should-retry"] == "false"
    assert str(exc) not in err.message or not str(exc)
    assert "object" not in err.message and "Received" not in err.message
