"""The LLM examples run as scripts: against their own in-process fake server, or the one named by LLM_BASE_URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasktree_dist.testing.fake_llm import ThreadedFakeLLM

ROOT = Path(__file__).resolve().parents[2]
LLM_ENV = ("LLM_BASE_URL", "LLM_API_KEY", "LLM_MODEL", "LLM_EXTRA_BODY", "LLM_INPUT_PRICE_PER_M",
           "LLM_OUTPUT_PRICE_PER_M", "OPENAI_API_KEY")


def run_example(name: str, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in LLM_ENV}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd, capture_output=True, text=True,
        timeout=60, env={**clean, **env},
    )


def field(stdout: str, label: str) -> str:
    return next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith(label + ":"))


def saved_trace(cwd: Path, stdout: str) -> dict[str, Any]:
    trace_id = field(stdout, "trace id")
    path = cwd / ".traces" / f"{trace_id}.json"
    assert path.is_file()
    return json.loads(path.read_text())


def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node.get("children", {}).values():
        out.extend(walk(child))
    return out


def messages_printed(stdout: str) -> list[dict[str, Any]]:
    lines = stdout.splitlines()
    start = lines.index("messages:") + 1
    return [json.loads(line) for line in lines[start:] if line.startswith("  {")]


def test_weather_agent_against_its_own_fake_server(tmp_path: Path) -> None:
    out = run_example("weather_agent.py", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "fake OpenAI-compatible server" in out.stdout
    assert field(out.stdout, "result") == "OK"
    answer = field(out.stdout, "final answer")
    assert '"city":"Tokyo"' in answer and '"condition":"sunny"' in answer
    roles = [m["role"] for m in messages_printed(out.stdout)]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert messages_printed(out.stdout)[1]["tool_calls"][0]["function"]["name"] == "get_weather"

    trace = saved_trace(tmp_path, out.stdout)
    assert "Tree(WeatherAgent)" in trace["children"]
    llm_nodes = [n for n in walk(trace) if n["kind"] == "LLM"]
    assert len(llm_nodes) == 2 and all(n["result"]["status"] == "OK" for n in llm_nodes)
    assert trace["total_tokens"]["total"] > 0
    loop = next(n for n in walk(trace) if n["kind"] == "While")
    assert loop["attributes"]["has_chat"] is True
    assert "Unclosed" not in out.stderr


def test_weather_agent_streams(tmp_path: Path) -> None:
    out = run_example("weather_agent.py", tmp_path, "--stream", "--question", "How is the weather in Lima?")
    assert out.returncode == 0, out.stderr
    answer = field(out.stdout, "final answer")
    assert '"city":"Lima"' in answer
    assert answer in out.stdout.split("final answer:")[0]  # streamed to stdout before the summary
    trace = saved_trace(tmp_path, out.stdout)
    assert all(n["attributes"]["stream"] is True for n in walk(trace) if n["kind"] == "LLM")


def test_weather_agent_uses_llm_base_url(tmp_path: Path, fake_llm: ThreadedFakeLLM) -> None:
    out = run_example("weather_agent.py", tmp_path, LLM_BASE_URL=fake_llm.base_url, LLM_API_KEY="sk-env",
                      LLM_MODEL="fake-gpt-mini", LLM_EXTRA_BODY='{"provider": {"sort": "price"}}')
    assert out.returncode == 0, out.stderr
    assert "fake OpenAI-compatible server" not in out.stdout
    assert fake_llm.calls_per_model == {"fake-gpt-mini": 2}  # the subprocess talked to this test's server
    first, second = fake_llm.requests
    assert first["provider"] == {"sort": "price"} and "reasoning" not in first
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]


def test_llm_batch(tmp_path: Path) -> None:
    out = run_example("llm_batch.py", tmp_path, "--docs", "12", "--concurrency", "4", "--fake-latency-ms", "20")
    assert out.returncode == 0, out.stderr
    assert "docs: 12  ok: 12  fail: 0  concurrency: 4" in out.stdout
    assert "LLMBatch: 12 documents" in out.stdout
    assert "Astronomers observed distant" in out.stdout  # a parsed summary in the table
    tokens = int(field(out.stdout, "tokens").split()[0])
    cost = float(field(out.stdout, "cost").lstrip("$"))
    assert tokens > 12 * 50 and cost > 0  # fake-priced reports a cost per call
    assert float(field(out.stdout, "wall time").split()[0]) > 0

    trace = saved_trace(tmp_path, out.stdout)
    assert trace["total_tokens"]["total"] == tokens
    assert abs(trace["total_cost"] - cost) < 1e-6
    gather = next(n for n in walk(trace) if n["kind"] == "Gather")
    docs = list(gather["children"].values())
    assert len(docs) == 12
    parsed = [n for n in walk(trace) if n["kind"] == "ParseJSON"]
    assert len(parsed) == 12 and all(n["result"]["status"] == "OK" for n in parsed)
    assert all(json.loads(n["result"]["data"])["keywords"] for n in parsed)


def test_llm_batch_reports_failed_documents(tmp_path: Path) -> None:
    out = run_example("llm_batch.py", tmp_path, "--docs", "3", "--fake-latency-ms", "0",
                      LLM_MODEL="fake-priced-fail-500")
    assert out.returncode == 1
    assert "docs: 3  ok: 0  fail: 3" in out.stdout
    assert out.stdout.count("FAIL") >= 3
    trace = saved_trace(tmp_path, out.stdout)
    llm_nodes = [n for n in walk(trace) if n["kind"] == "LLM"]
    assert len(llm_nodes) == 3 and all(n["attributes"]["status_code"] == 500 for n in llm_nodes)


def test_llm_batch_module_api() -> None:
    """The trees are registered by name at import; build_job/run are what a distributed demo calls."""
    import importlib

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    llm_batch = importlib.import_module("examples.llm_batch")  # as the workers import it (TASKTREE_IMPORTS)
    from tasktree_dist import get_tree

    assert get_tree("SummariseDoc") is llm_batch.summarise_doc
    assert get_tree("LLMBatch") is llm_batch.llm_batch
    tree, batch = llm_batch.build_job(5, settings=llm_batch.LLMSettings("m", "http://x/v1", fake=True))
    assert tree is llm_batch.llm_batch and len(batch.docs) == 5
    assert llm_batch.build_job(5, 3, settings=llm_batch.LLMSettings())[0].name == "LLMBatch-c3"
    assert "REPLY:" in llm_batch.make_messages(batch.docs[1])[0]["content"]
