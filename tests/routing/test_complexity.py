"""Request complexity: easy requests score low, hard ones high, each signal pushes the right way, and odd
bodies (multimodal, malformed) neither crash nor count what is not text."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from llm_gateway.routing.complexity import WEIGHTS, Complexity, score_request

CODE = ("```python\ndef merge(a: list[int], b: list[int]) -> list[int]:\n    out = []\n    while a and b:\n"
        "        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n    return out + a + b\n```\n")
TOOLS = [{"type": "function", "function": {"name": "run_tests", "parameters": {"type": "object"}}}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def score(**params: Any) -> float:
    return score_request(params).score


BASE = "Can you help me write a note to my landlord about the broken heating in the flat?"


def test_weights_sum_to_one_and_signals_are_reported() -> None:
    assert math.isclose(sum(WEIGHTS.values()), 1.0)
    result = score_request({"messages": [user(BASE)]})
    assert isinstance(result, Complexity) and set(result.signals) == set(WEIGHTS)
    assert result.score == pytest.approx(sum(result.signals.values()), abs=1e-3)


def test_hi_scores_low() -> None:
    assert score(messages=[user("hi")]) < 0.2
    assert score(messages=[{"role": "system", "content": "You are a helpful assistant."},
                           user("What is the capital of France?")]) < 0.2


def test_a_long_multi_turn_code_review_with_tools_and_a_proof_scores_high() -> None:
    messages = [{"role": "system", "content": "You are a senior engineer reviewing pull requests."},
                user("Please review this merge function from our PR:\n" + CODE * 6),
                assistant("It looks correct, but popping from the front of a list is O(n). " * 5),
                user("What about the empty-list case?"),
                assistant("Both loops handle it: the while condition is false and the rest is returned."),
                user("Prove step by step that merge returns a sorted list, and analyze its worst-case complexity "
                     "compared to a heap-based design.")]
    result = score_request({"messages": messages, "tools": TOOLS})
    assert result.score > 0.6, result


def test_the_end_to_end_routing_prompt_clears_its_threshold() -> None:
    """The hard prompt tests/routing/test_routing.py sends through a route with threshold 0.4 (no tools)."""
    hard_prompt = ("Prove step by step that this algorithm is correct, analyze its complexity and compare "
                   "the trade-offs with a heap-based design:\n```python\ndef merge(a, b):\n    out = []\n"
                   "    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n"
                   "    return out + a + b\n```\n") * 6
    messages = [user("I need help with a proof."), assistant("Sure, send it."), user(hard_prompt)]
    assert score(messages=messages) >= 0.4 > score(messages=[user("hi")])


# --------------------------------------------------------------------------------------------------------------
# each signal, alone, moves the score up
# --------------------------------------------------------------------------------------------------------------

def test_length_raises_the_score_and_saturates() -> None:
    short, medium, long_, huge = (score(messages=[user(BASE + " Some more context here." * n)])
                                  for n in (0, 20, 200, 2000))
    assert short < medium < long_ <= huge
    assert score_request({"messages": [user("x " * 40_000)]}).signals["length"] == WEIGHTS["length"]


def test_code_raises_the_score() -> None:
    plain = score(messages=[user(BASE)])
    fenced = score(messages=[user(BASE + "\n" + CODE)])
    unfenced = score(messages=[user(BASE + "\nimport os\ndef main():\n    return os.getcwd()\n")])
    assert fenced > plain and unfenced > plain
    # a fenced block earlier in the conversation counts too
    assert score_request({"messages": [user("look:\n" + CODE), assistant("ok"), user(BASE)]}).signals["code"] > 0


def test_one_prose_word_that_looks_like_code_is_not_code() -> None:
    assert score_request({"messages": [user("Which class of problems is this in?")]}).signals["code"] == 0


def test_reasoning_cues_in_the_last_user_message_raise_the_score() -> None:
    plain = score(messages=[user(BASE)])
    one = score(messages=[user(BASE + " Explain why it matters.")])
    two = score(messages=[user(BASE + " Explain why it matters, step by step.")])
    many = score(messages=[user(BASE + " Prove it step by step, derive the bound and compare the trade-offs.")])
    assert plain < one < two < many


def test_math_symbols_are_a_reasoning_cue() -> None:
    assert score_request({"messages": [user("Show that ∀x ∈ ℝ, x² ≥ 0")]}).signals["reasoning"] > 0
    assert score_request({"messages": [user(r"Simplify \frac{a}{b} + \frac{c}{d}")]}).signals["reasoning"] > 0


def test_only_the_last_user_message_is_read_for_cues() -> None:
    earlier = [user("Prove step by step and analyze the trade-offs."), assistant("Done."), user("thanks!")]
    assert score_request({"messages": earlier}).signals["reasoning"] == 0


def test_cues_match_word_starts_not_inside_words() -> None:
    assert score_request({"messages": [user("Please improve and approve my informal email")]}).signals[
        "reasoning"] == 0


def test_tools_raise_the_score() -> None:
    assert score(messages=[user(BASE)], tools=TOOLS) > score(messages=[user(BASE)])
    assert score(messages=[user(BASE)], tools=[]) == score(messages=[user(BASE)])


def test_conversation_depth_raises_the_score() -> None:
    def turns(n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _ in range(n - 1):
            out += [user("ok"), assistant("ok")]
        return [*out, user(BASE)]

    one, three, eight, twenty = (score_request({"messages": turns(n)}).signals["depth"] for n in (1, 3, 8, 20))
    assert one == 0 < three < eight == twenty == WEIGHTS["depth"]


def test_a_json_schema_raises_the_score() -> None:
    plain = score(messages=[user(BASE)])
    json_object = score(messages=[user(BASE)], response_format={"type": "json_object"})
    schema = score(messages=[user(BASE)], response_format=SCHEMA)
    assert plain < json_object < schema
    assert score(messages=[user(BASE)], response_format={"type": "text"}) == plain


# --------------------------------------------------------------------------------------------------------------
# bounds, shapes, determinism
# --------------------------------------------------------------------------------------------------------------

def test_score_stays_within_zero_and_one() -> None:
    everything = {"messages": [user("x" * 100_000 + CODE + "Prove, derive, analyze, compare, optimize, design "
                                    "step by step ∀∃ trade-off")] * 30,
                  "tools": TOOLS, "response_format": SCHEMA}
    assert score(**everything) == 1.0
    assert score() == 0.0 and score(messages=[]) == 0.0


@pytest.mark.parametrize("params", [
    {"messages": None}, {"messages": "hi"}, {"messages": [None, 3, "x", {"content": 5}, {"role": "user"}]},
    {"messages": [user([None, {"type": "text"}, {"type": "text", "text": None}, "loose string"])]},
    {"messages": [user("hi")], "response_format": "json_schema", "tools": None},
])
def test_malformed_bodies_do_not_crash(params: dict[str, Any]) -> None:
    assert 0.0 <= score_request(params).score <= 1.0


def test_multimodal_content_counts_only_its_text() -> None:
    text = "Compare these two diagrams and explain why the second design is better. " * 10
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 200_000}}
    multimodal = [image, {"type": "text", "text": text}, {"type": "input_audio", "input_audio": {"data": "B" * 999}}]
    assert score_request({"messages": [user(multimodal)]}) == score_request({"messages": [user(text)]})
    only_images = score_request({"messages": [user([image, image])]})
    assert only_images.score == 0.0


def test_deterministic_and_does_not_mutate_the_body() -> None:
    params = {"messages": [user("review:\n" + CODE), assistant("ok"), user("Prove it step by step")],
              "tools": TOOLS, "response_format": SCHEMA}
    before = copy.deepcopy(params)
    first = score_request(params)
    assert all(score_request(params) == first for _ in range(10))
    assert params == before
    assert first.score == round(first.score, 3)
