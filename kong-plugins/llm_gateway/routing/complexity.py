"""How hard a chat request looks, for cost/quality routing (what RouteLLM and Not Diamond do, minus the model
call): a score in [0, 1] from cheap signals of the request body, so a routing alias sends requests at or above
its threshold to a strong model and the rest to a cheap one.

It runs on every request of a routing alias, so it is substring scans over bounded windows of text (no
tokenizer, no regex over the prompt, no LiteLLM): microseconds for a short chat, and since the windows are
bounded, about a tenth of a millisecond at worst however long the conversation. It is a heuristic to tune a
threshold against (docs/routing.md), not a classifier: the signals are recorded with the score so the weights
can be revisited from real traffic.

Signals, each in [0, 1] before weighting; the weights sum to 1:

    length     0.20  conversation text (every message, text parts only), ~chars/4 tokens: 0 up to 16
                     tokens, 1 from 4,000, log-scaled between (each doubling adds the same).
    code       0.20  1 for a fenced block (```) in the newest 16k characters of the conversation; otherwise
                     code-looking tokens in the last user message ("def ", "class ", ";\\n", "{\\n", ...):
                     one alone is prose ("a class of"), two give 0.5, three or more 1.
    reasoning  0.30  reasoning cues in the last user message only (the ask, not the context): "prove",
                     "step by step", "explain why", "analy…", "compar…", "deriv…", "optimi…", "trade-off",
                     "design", math symbols or LaTeX, ...; distinct cues / 3, saturating. The heaviest: it is
                     the most direct sign of a hard ask, where length also grows with easy work (summaries).
    tools      0.15  tools (or legacy functions) offered: the model has to plan calls.
    depth      0.10  user turns: 0 for the first, 1 from the 8th.
    schema     0.05  response_format json_schema 1 (json_object 0.5): structured output is easy to get wrong.

Text is read from string contents and the ``text`` parts of multimodal ones (images, audio and files add
nothing). The last user message is read in two windows, its first and last 800 characters, since the ask
sits before or after whatever was pasted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

WEIGHTS: Mapping[str, float] = MappingProxyType({
    "length": 0.20, "code": 0.20, "reasoning": 0.30, "tools": 0.15, "depth": 0.10, "schema": 0.05,
})

_LENGTH_FLOOR_TOKENS = 16
_LENGTH_FULL_TOKENS = 4000
_LOG_LENGTH_RANGE = math.log(_LENGTH_FULL_TOKENS / _LENGTH_FLOOR_TOKENS)
_DEPTH_FULL_TURNS = 8
_CUES_FULL = 3
_ASK_WINDOW = 800  # characters read at each end of the last user message
_FENCE_SCAN_CHARS = 16_000  # newest characters of the conversation searched for a fenced block

#: case-sensitive, in the raw text: code keywords are lowercase in most languages, SQL's are not
_CODE_MARKERS = ("def ", "class ", "import ", "return ", "function ", "const ", " => ", ";\n", "{\n", "}\n",
                 "#include", "SELECT ", "self.", "</")

#: one cue per tuple, any spelling counts; matched in the lowercased ask with a leading space and newlines as
#: spaces, so a leading space means "starts a word" (" prove" is not "improve", " formal" is not "informal")
_CUES = (
    (" prove", " proof"),
    ("step by step", "step-by-step"),
    ("explain why", "why does"),
    ("analy",),
    ("compar",),
    (" deriv",),
    ("optimi",),
    ("trade-off", "tradeoff", "trade off"),
    (" design",),
    ("architect",),
    ("algorithm",),
    ("complexity",),
    ("theorem", "lemma"),
    ("rigor",),
    ("invariant",),
    ("edge case",),
    ("root cause",),
    ("pros and cons",),
    ("think through", "reason about"),
    ("evaluat",),
    ("critique",),
    ("debug",),
    ("refactor",),
    ("correctness",),
    (" formal",),
)
_CUE_NEEDLES = tuple((needle, i) for i, spellings in enumerate(_CUES) for needle in spellings)
_MATH_CUE = len(_CUES)
_MATH_SYMBOLS = re.compile("[∑∏∫∮∂∇∀∃∄∈∉⊂⊆⊃⊇∪∩≤≥≠≈≡√∞⇒⇔→]")  # compiled once; searched only in non-ASCII text
_LATEX = ("\\frac", "\\sum", "\\int", "\\forall", "\\exists", "\\leq", "\\geq", "\\sqrt", "\\mathbb", "\\lim")


@dataclass(frozen=True)
class Complexity:
    score: float  # 0 easy .. 1 hard, rounded to 3 decimals
    signals: Mapping[str, float]  # each signal's weighted contribution (rounded to 4 decimals), for the record


def _text(content: Any) -> str:
    """A message's text: the string itself, or the text parts of a multimodal list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, Mapping) and part.get("type") == "text"]
        return "\n".join(t for t in texts if isinstance(t, str))
    return ""


def _window(text: str) -> str:
    return text if len(text) <= 2 * _ASK_WINDOW else f"{text[:_ASK_WINDOW]}\n{text[-_ASK_WINDOW:]}"


def _reasoning_cues(ask: str) -> int:
    """How many distinct cues the ask holds."""
    lowered = " " + ask.lower().replace("\n", " ")
    found = {cue for needle, cue in _CUE_NEEDLES if needle in lowered}
    if (not ask.isascii() and _MATH_SYMBOLS.search(ask)) or ("\\" in ask and any(m in ask for m in _LATEX)):
        found.add(_MATH_CUE)
    return len(found)


def _fenced(texts: list[str]) -> bool:
    """A fenced code block in the newest ``_FENCE_SCAN_CHARS`` of the conversation."""
    budget = _FENCE_SCAN_CHARS
    for text in reversed(texts):
        if "```" in (text if len(text) <= budget else text[-budget:]):
            return True
        budget -= len(text)
        if budget <= 0:
            return False
    return False


def score_request(params: Mapping[str, Any]) -> Complexity:
    """Score an OpenAI chat request body (``messages``, ``tools``, ``response_format``, ...). Never raises on a
    malformed body: what cannot be read counts as absent."""
    messages = params.get("messages")
    texts: list[str] = []
    chars = user_turns = 0
    ask = ""
    if isinstance(messages, list | tuple):
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            text = _text(message.get("content"))
            texts.append(text)
            chars += len(text)
            if message.get("role") == "user":
                user_turns += 1
                ask = text
    window = _window(ask)

    tokens = chars / 4
    length = 0.0 if tokens <= _LENGTH_FLOOR_TOKENS else min(
        1.0, math.log(tokens / _LENGTH_FLOOR_TOKENS) / _LOG_LENGTH_RANGE)
    if _fenced(texts):
        code = 1.0
    else:
        markers = sum(1 for marker in _CODE_MARKERS if marker in window)
        code = min(1.0, max(0, markers - 1) / 2)
    reasoning = min(1.0, _reasoning_cues(window) / _CUES_FULL) if window else 0.0
    tools = 1.0 if params.get("tools") or params.get("functions") else 0.0
    depth = min(1.0, max(0, user_turns - 1) / (_DEPTH_FULL_TURNS - 1))
    response_format = params.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    schema = 1.0 if kind == "json_schema" else 0.5 if kind == "json_object" else 0.0

    w = WEIGHTS
    contributions = {"length": length * w["length"], "code": code * w["code"],
                     "reasoning": reasoning * w["reasoning"], "tools": tools * w["tools"],
                     "depth": depth * w["depth"], "schema": schema * w["schema"]}
    score = min(1.0, max(0.0, sum(contributions.values())))
    return Complexity(score=round(score, 3),
                      signals={k: round(v, 4) if v else 0.0 for k, v in contributions.items()})  # round() is slow
