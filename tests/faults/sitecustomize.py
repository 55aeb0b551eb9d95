"""Faults for tests/listener/test_listener_hardening.py, injected into a real plugin server process at its start (Python
imports ``sitecustomize`` from PYTHONPATH): when LLM_GATEWAY_TEST_FAULTS is set, a request whose body or
messages carry a marker makes one piece of the gateway raise, as a bug there would.

* ``FAULT:estimate`` in a message: the token estimator raises (so the ledger's ``finish`` does, at the end of a
  stream the provider cut without reporting usage: issue 10, item 3).
* ``FAULT:parse`` in the body: request parsing raises before any accounting exists (an unexpected 500).
* ``FAULT:block-loop-<seconds>`` in the body: request parsing blocks the event loop that long, as a CPU-bound
  bug would (liveness must say so: tests/operations/test_health.py).
"""

from __future__ import annotations

import os
import re
import time

if os.environ.get("LLM_GATEWAY_TEST_FAULTS"):
    from llm_gateway.api import chat_completions

    _estimate_prompt_tokens = chat_completions.estimate_prompt_tokens
    _parse_chat_request = chat_completions.parse_chat_request

    def estimate_prompt_tokens(model, messages):  # type: ignore[no-untyped-def]
        if "FAULT:estimate" in repr(messages):
            raise TypeError("injected: 'int' object is not iterable")
        return _estimate_prompt_tokens(model, messages)

    def parse_chat_request(body):  # type: ignore[no-untyped-def]
        if b"FAULT:parse" in body:
            raise RuntimeError("injected parse failure")
        if blocked := re.search(rb"FAULT:block-loop-([0-9.]+)", body):
            time.sleep(float(blocked.group(1)))
        return _parse_chat_request(body)

    chat_completions.estimate_prompt_tokens = estimate_prompt_tokens
    chat_completions.parse_chat_request = parse_chat_request
