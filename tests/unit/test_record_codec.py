"""Unit records are stored compressed and read back as the same completion (distributed.record_codec)."""

from __future__ import annotations

import pytest

from tasktree_dist.distributed import record_codec
from tasktree_dist.distributed.protocol import Completion


def llm_completion(i: int) -> Completion:
    """A completion shaped like a one-LLM Gather child's (result, trace fragment with the LLM node)."""
    reply = {"input_messages": [{"role": "user", "content": f"REPLY:answer {i}"}],
             "emitted_messages": [{"role": "assistant", "content": f"answer {i}"}], "final_output": f"answer {i}",
             "finish_reason": "stop", "model": "fake-gpt", "usage": {"prompt": 2, "completion": 2, "total": 4}}
    llm = {"name": "LLM", "kind": "LLM", "started": 1.0, "ended": 1.2, "cost": 0.0, "logs": [],
           "result": {"status": 0, "data": str(reply)},
           "attributes": {"model": "fake-gpt", "base_url": "http://127.0.0.1:1/v1", "latency_ms": 205.0,
                          "chat_transcript": reply["input_messages"] + reply["emitted_messages"]}, "children": []}
    tree = {**llm, "name": f"{i}_Tree(Call)", "kind": "Tree", "attributes": {}, "children": [llm]}
    return Completion(execution_id=f"run:Batch/Gather[{i}]@0.0", status="OK", data=reply, changes={}, trace=tree,
                      worker="w1@vm", pid=4242, celery_task_id="7df9a046-62e5-4ba7-8005-1c95f9088de9",
                      queue="tasktree", queued_ms=13.2, run_ms=208.3)


def test_a_large_completion_is_stored_compressed_and_reads_back_the_same() -> None:
    completion = llm_completion(7)
    plain = completion.model_dump_json().encode()
    stored = completion.to_record()
    assert stored.startswith(record_codec.TAG_V1) and len(stored) < len(plain) / 3
    assert Completion.from_record(stored) == completion


def test_short_records_and_records_written_as_json_read_as_they_are() -> None:
    short = Completion(execution_id="r:1", status="FAIL", error="boom")
    assert short.to_record() == short.model_dump_json().encode()  # below MIN_SIZE: JSON as is
    older = llm_completion(3).model_dump_json()  # a record from before the codec, or a slim reply
    assert Completion.from_record(older) == Completion.from_record(older.encode()) == llm_completion(3)


def test_a_corrupt_compressed_record_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="corrupt compressed unit record"):
        Completion.from_record(record_codec.TAG_V1 + b"not deflate at all")
