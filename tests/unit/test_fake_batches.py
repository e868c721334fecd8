"""The fake server's Files and Batches API, through openai-python's real client over HTTP: uploads, batches that
complete after a delay, errored shares, expired and failed outcomes, cancel, list, a provider without the API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import orjson
import pytest

from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tests.helpers import eventually


def requests_jsonl(n: int) -> bytes:
    return b"".join(orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "fake-gpt", "messages": [{"role": "user", "content": f"REPLY:answer {i}"}]}}) + b"\n"
        for i in range(n))


@pytest.fixture
async def client(fake_llm: ThreadedFakeLLM) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake_llm.base_url, api_key="k", max_retries=0) as client:
        yield client


async def lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    content = (await client.files.content(file_id)).content
    return [orjson.loads(line) for line in content.splitlines()]


async def create(client: openai.AsyncOpenAI, n: int) -> openai.types.Batch:
    uploaded = await client.files.create(file=("in.jsonl", requests_jsonl(n)), purpose="batch")
    assert uploaded.bytes == len(requests_jsonl(n)) and uploaded.purpose == "batch"
    return await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")


async def test_a_batch_completes_after_its_delay_with_outputs_and_errors_by_custom_id(
    fake_llm: ThreadedFakeLLM, client: openai.AsyncOpenAI
) -> None:
    fake_llm.batches.configure(delay_s=0.3, error_share=0.25)
    batch = await create(client, 8)
    assert batch.status == "in_progress" and batch.request_counts.total == 8

    async def completed() -> openai.types.Batch | None:
        found = await client.batches.retrieve(batch.id)
        return found if found.status == "completed" else None

    done = await eventually(completed, "the batch completed after its delay", within=10)
    assert done.status == "completed" and done.request_counts.completed == 6 and done.request_counts.failed == 2
    output, errors = await lines(client, done.output_file_id), await lines(client, done.error_file_id)
    answers = {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in output}
    assert answers == {f"c{i}": f"answer {i}" for i in (0, 1, 2, 4, 5, 6)}
    assert {line["custom_id"] for line in errors} == {"c3", "c7"}
    assert {line["response"]["status_code"] for line in errors} == {500}
    assert output[0]["response"]["body"]["usage"]["total_tokens"] > 0


async def test_expired_failed_and_cancelled_batches(fake_llm: ThreadedFakeLLM, client: openai.AsyncOpenAI) -> None:
    fake_llm.batches.configure(outcome="expired")
    expired = await client.batches.retrieve((await create(client, 4)).id)
    assert expired.status == "expired"
    assert [line["custom_id"] for line in await lines(client, expired.output_file_id)] == ["c0", "c1"]
    assert {line["error"]["code"] for line in await lines(client, expired.error_file_id)} == {"batch_expired"}
    fake_llm.batches.configure(outcome="failed")
    failed = await client.batches.retrieve((await create(client, 2)).id)
    assert failed.status == "failed" and failed.output_file_id is None and failed.errors.data
    fake_llm.batches.configure(outcome="completed", delay_s=60)
    running = await create(client, 2)
    cancelled = await client.batches.cancel(running.id)
    assert cancelled.status == "cancelled" and (await client.batches.retrieve(running.id)).output_file_id is None
    listed = [batch.id async for batch in client.batches.list()]
    assert listed[:3] == [running.id, failed.id, expired.id]


async def test_bad_input_lines_fail_validation_and_a_provider_without_the_api_answers_404(
    fake_llm: ThreadedFakeLLM, client: openai.AsyncOpenAI
) -> None:
    uploaded = await client.files.create(file=("in.jsonl", b'{"no_custom_id": 1}\n'), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    assert batch.status == "failed" and batch.errors.data[0].code == "invalid_json_line"
    fake_llm.batches.configure(enabled=False)
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
