"""``POST /v1/completions``: OpenAI's legacy text completions, validated against ``CreateCompletionRequest``.

Every field of the published schema is admitted with its type and range; unknown fields are refused by name
(a client that sets a parameter expects it to matter). ``max_tokens`` defaults to 16 as OpenAI's does, and is
sent explicitly, so the provider, the budget reservation and the reply agree on it. Whether a deployment can
honour a request (token-id prompts, echo, logprobs, suffix, best_of, several prompts need a provider that
speaks text completions natively) is decided per deployment in ``providers.completions``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.accounting.tokens import estimate_completion_tokens
from llm_gateway.api.base import OPENAI_ERRORS, ErrorFormat
from llm_gateway.api.chat_completions import (
    Check,
    _boolean,
    _int_range,
    _is_int,
    _logit_bias,
    _range,
    _stop,
    _stream_options,
    _string,
)
from llm_gateway.api.request_body import refuse_unknown, request_object
from llm_gateway.config import Deployment
from llm_gateway.errors import bad_request
from llm_gateway.providers import completions as provider
from llm_gateway.providers.openai_compatible import Usage

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint (the schema's ``max_tokens.default``)
MAX_PROMPTS = 2048  # OpenAI's limit on the prompts of one request


def _non_negative_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else "expected an integer of at least 0"


PARAMETERS: dict[str, Check] = {
    "best_of": _int_range(0, 20),
    "echo": _boolean,
    "frequency_penalty": _range(-2, 2),
    "presence_penalty": _range(-2, 2),
    "logit_bias": _logit_bias,
    "logprobs": _int_range(0, 5),
    "max_tokens": _non_negative_int,
    "n": _int_range(1, 128),
    "seed": _int_range(-(2 ** 63), 2 ** 63 - 1),
    "stop": _stop,
    "suffix": _string,
    "temperature": _range(0, 2),
    "top_p": _range(0, 1),
    "user": _string,
}
GATEWAY_FIELDS = frozenset({"model", "prompt", "stream", "stream_options"})


def _token_ids(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_int(t) and t >= 0 for t in v)


def check_prompt(prompt: Any) -> str | None:
    """The schema's four prompt shapes: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, list) or not prompt:
        return "expected a string, a list of strings, a list of token ids or a list of token-id lists"
    if len(prompt) > MAX_PROMPTS:
        return f"at most {MAX_PROMPTS} prompts per request"
    if all(isinstance(p, str) for p in prompt) or _token_ids(prompt) or all(_token_ids(p) for p in prompt):
        return None
    return "expected a string, a list of strings, a list of token ids or a list of token-id lists"


@dataclass
class CompletionRequest:
    """A validated text-completion request (an ``api.base.ApiRequest``)."""

    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk (it is always requested upstream)
    params: dict[str, Any]  # prompt, max_tokens and every parameter set (not null)
    endpoint: str = "completions"
    limit_keys: tuple[str, ...] = ("max_tokens",)
    _prompt_tokens: dict[str, int] = field(default_factory=dict, repr=False)

    def prompt_tokens(self, model: str) -> int:
        """The prompt's tokens on ``model``: token ids counted as given, texts by LiteLLM's counter."""
        if model not in self._prompt_tokens:
            prompt = self.params["prompt"]
            prompts = [prompt] if isinstance(prompt, str) or _token_ids(prompt) else prompt
            self._prompt_tokens[model] = sum(len(p) if isinstance(p, list) else estimate_completion_tokens(model, p)
                                             for p in prompts)
        return self._prompt_tokens[model]

    def chat_view(self) -> dict[str, Any]:
        """As an OpenAI chat body, for complexity routing: each text prompt a user message."""
        prompt = self.params["prompt"]
        prompts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
        return {"messages": [{"role": "user", "content": p} for p in prompts]}


def parse_completion_request(body: bytes) -> CompletionRequest:
    """The request, validated: GatewayError 400 naming the field otherwise."""
    data, model = request_object(body)  # valid JSON, bounded nesting, no NaN: as on chat completions
    if "prompt" not in data or data["prompt"] is None:
        raise bad_request("'prompt' is required", param="prompt")
    if error := check_prompt(data["prompt"]):
        raise bad_request(f"'prompt': {error}", param="prompt")
    stream = data.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    stream_options = data.get("stream_options")
    if stream_options is not None and (error := _stream_options(stream_options)):
        raise bad_request(f"'stream_options': {error}", param="stream_options")
    refuse_unknown(data, PARAMETERS.keys() | GATEWAY_FIELDS)
    params: dict[str, Any] = {"prompt": data["prompt"]}
    for name, check in PARAMETERS.items():
        if data.get(name) is not None:
            if error := check(data[name]):
                raise bad_request(f"'{name}': {error}", param=name)
            params[name] = data[name]
    params.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    best_of = params.get("best_of")
    if best_of is not None and best_of < params.get("n", 1):
        raise bad_request("'best_of' must be at least 'n'", param="best_of")
    if stream and best_of is not None and best_of > 1:
        raise bad_request("'best_of' greater than 1 cannot be streamed", param="best_of")
    # LiteLLM's text-completion stream numbers every choice 0, so several choices could not be told apart
    prompt = params["prompt"]
    if stream and isinstance(prompt, list) and len(prompt) > 1 and not _token_ids(prompt):
        raise bad_request("'prompt': one prompt per streamed request (several can be sent with stream false)",
                          param="prompt")
    if stream and params.get("n", 1) > 1:
        raise bad_request("'n' greater than 1 cannot be streamed here; send stream false for several choices",
                          param="n")
    return CompletionRequest(model=model, stream=stream,
                             include_usage=bool(stream and stream_options and stream_options.get("include_usage")),
                             params=params)


class Completions:
    """The endpoint the listener serves through the common pipeline (``api.base.Endpoint``)."""

    name = "completions"
    path = "/v1/completions"
    errors: ErrorFormat = OPENAI_ERRORS
    stream_end = b"data: [DONE]\n\n"

    def parse(self, body: bytes) -> CompletionRequest:
        return parse_completion_request(body)

    async def complete(self, deployment: Deployment, request: CompletionRequest, usage: Usage) -> bytes:  # type: ignore[override]
        return await provider.complete(deployment, request.params, usage)

    async def open_stream(self, deployment: Deployment, request: CompletionRequest,  # type: ignore[override]
                          usage: Usage) -> AsyncIterator[bytes]:
        return await provider.open_stream(deployment, request.params, request.include_usage, usage)


ENDPOINT = Completions()
