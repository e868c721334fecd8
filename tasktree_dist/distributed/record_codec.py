"""Unit records as stored: a completion's JSON deflated against a preset dictionary, so a kept unit costs < 1 KB.

A run keeps every unit's completion (result, blackboard changes, trace fragment) for TASKTREE_RUN_RETENTION (a
week by default): at 2.6 KB of JSON for a one-LLM unit, records cost 3.2 KB of Redis each, so a 100,000-document
batch held over 300 MB. Most of those bytes are the library's own field names and the reply said three times (the
result, and the Tree's and the LLM node's trace results). Raw DEFLATE with a preset dictionary of those names
brings such a record to ~360 bytes (835 with plain zlib) for 10-15 us of the worker's CPU and a few us to read back
(measured 2026-12-06). Nothing is dropped: replay, retry and the trace viewer read the same completion back.

Format: a record starting with `{` is JSON as is (those under MIN_SIZE, and every record written before this
codec); one starting with TAG_V1 is raw DEFLATE (wbits -15) against DICTIONARY_V1. A dictionary never changes once
records use it: a new one gets a new tag, and readers keep the old ones.
"""

from __future__ import annotations

import zlib

TAG_V1 = b"\x01"
#: Records shorter than this stay JSON: they are within the 1 KB a kept unit may cost, and deflate's fixed setup
#: (~10 us) was 5 % of a trivial unit's fleet CPU (a Function unit's 0.7 KB record: dispatch_vs_celery.py).
MIN_SIZE = 1024

_LLM_RECORD = (
    '"input_messages":[{"role":"user","content":""}],"emitted_messages":[{"role":"assistant","content":""}],'
    '"messages":[],"tool_calls":[],"tool_results":[],"final_output":"","finish_reason":"stop","model":"",'
    '"usage":{"prompt":,"completion":,"total":},"cost":0.0'
)
#: Field names and shapes of Completion, its trace fragment and LLMRunRecord (DEFLATE favours the end of it).
DICTIONARY_V1 = (
    '{"execution_id":"","status":"OK","data":{"__tt__":"obj","type":"tasktree_dist.llm.types:LLMRunRecord",'
    '"fields":{' + _LLM_RECORD + '}},"changes":{},"trace":{"name":"","kind":"Tree","started":,"ended":,"cost":0.0,'
    '"logs":[],"result":{"status":0,"data":"{' + _LLM_RECORD.replace('"', '\\"') + '}"},"attributes":{},'
    '"children":[{"name":"LLM","kind":"LLM","attributes":{"model":"","base_url":"","stream":false,'
    '"messages_count":,"tools":[],"api_key":"***","input_price_per_m":0.0,"output_price_per_m":0.0,'
    '"transport":"direct","latency_ms":,"tokens":{"prompt":,"completion":,"total":},"prompt_tokens":,'
    '"completion_tokens":,"total_tokens":,"output":"","finish_reason":"stop","chat_transcript":[],'
    '"emitted_messages":[],"has_chat":true,"chat_messages_count":}]},"error":null,"worker":"","pid":,'
    '"celery_task_id":"","queue":"tasktree","queued_ms":,"run_ms":,"extra":{},'
    '"totals":{"cost":0.0,"tokens":{"prompt":,"completion":,"total":}},"alerts":null}'
).encode()


def pack(record: bytes) -> bytes:
    """The stored form of a completion's JSON."""
    if len(record) < MIN_SIZE:
        return record
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15, zlib.DEF_MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, DICTIONARY_V1)
    return TAG_V1 + deflate.compress(record) + deflate.flush()


def unpack(stored: bytes | str) -> bytes | str:
    """A completion's JSON from its stored form (JSON passes through: older records, short ones, replies)."""
    if isinstance(stored, bytes) and stored[:1] == TAG_V1:
        try:
            inflate = zlib.decompressobj(-15, DICTIONARY_V1)
            return inflate.decompress(stored[1:]) + inflate.flush()
        except zlib.error as exc:
            raise ValueError(f"corrupt compressed unit record: {exc}") from None
    return stored
