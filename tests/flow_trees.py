"""Trees the flow-control fleet tests run (tests/fleet/test_flow_fleet.py); their workers import this module
(TASKTREE_IMPORTS=tests.flow_trees). FLOW_FAKE_URL names the fake LLM server the test started before them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tasktree_dist import LLMDeployment, LLMModel, LLMProvider, Tree

FAKE_URL = os.environ.get("FLOW_FAKE_URL", "http://127.0.0.1:9/v1")
WINDOW_S = 2.0
#: The fake server counts words: a call of `words` filler words costs 2 + words prompt and 4 completion tokens.
WORDS = 39
CALL_TOKENS = 2 + WORDS + 4
#: Limits of "flow-rate": TPM binds (10 calls a window), RPM (12) is enforced too.
RPM, TPM = 12, 10 * CALL_TOKENS
SLOW_HEADERS = {"X-Fake-Latency-Ms": "60000"}
BURST_HEADERS = {"X-Fake-Fault": "fail-429", "X-Fake-Fail-Times": "1", "X-Fake-Retry-After": "2"}
#: Each tenant may have 2 calls in flight on the provider, whatever the model.
TENANTS = LLMProvider(FAKE_URL, "sk-flow", concurrency=2, concurrency_key=lambda b: b.tenant)

MODELS = {
    "flow-rate": LLMModel("flow-rate", rpm=RPM, tpm=TPM, window_s=WINDOW_S),
    "flow-burst": LLMModel("flow-burst", concurrency=50, llm_call_kwargs={"extra_headers": BURST_HEADERS}),
    "flow-k": LLMModel("flow-k", concurrency=3),
    "flow-t1": LLMModel("flow-t1", TENANTS),
    "flow-t2": LLMModel("flow-t2", TENANTS),
    "flow-budget": LLMModel("flow-budget"),
    "flow-slow": LLMModel("flow-slow", concurrency=2, llm_call_kwargs={"extra_headers": SLOW_HEADERS}),
    # batch mode: the fake server's Batch API answers; prices to check batch_price_factor
    "flow-batch": LLMModel("flow-batch", batch=True, input_price_per_m=1.0, output_price_per_m=2.0),
    # two deployments on the fake server: the heavy one always fails (HTTP 500), so it cools down (routing)
    "flow-routed": LLMModel("flow-routed", deployments=[
        LLMDeployment(LLMProvider(FAKE_URL, "sk-flow"), "flow-routed-a"),
        LLMDeployment(LLMProvider(FAKE_URL, "sk-flow"), "flow-routed-fail-500", weight=10_000),
    ]),
}


@dataclass
class Ask:
    i: int
    model: str
    words: int = 0
    tenant: str = ""


@dataclass
class Batch:
    asks: list[Ask] = field(default_factory=list)


def model_of(b: Ask) -> LLMModel:
    return MODELS[b.model]


def messages(b: Ask) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"REPLY:answer {b.i}" + " w" * b.words}]


AskTree = Tree[Ask]("FlowFleetAsk").LLM(model_of, messages, api_key="sk-flow", base_url=FAKE_URL, max_tokens=4).End()


def _asks(b: Batch) -> tuple[list[Tree[Ask]], list[Ask]]:
    return [AskTree] * len(b.asks), b.asks


#: The coordinator's trees (never shipped: only their Gather children travel), one per concurrency limit.
BATCHES = {limit: Tree[Batch](f"FlowFleetBatch{limit}").Gather(_asks, concurrency_limit=limit).End()
           for limit in (2, 3, 4, 6, 12, 16)}
