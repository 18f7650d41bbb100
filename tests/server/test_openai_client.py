"""Drives a running `pocketlm serve` with the official `openai` Python client (and raw HTTP
for what the client cannot send): models, chat and text completions with and without
streaming, usage with cached tokens, 8 concurrent requests, malformed JSON (400), an
oversized body (413), refused features (400), a client disconnecting mid-stream, and the
server healthy afterwards.

    python3 tests/server/test_openai_client.py http://127.0.0.1:PORT MODEL_ID MAX_BODY_BYTES
"""

import concurrent.futures
import http.client
import json
import sys
import urllib.parse

import openai

base, model_id, max_body = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
host = urllib.parse.urlparse(base)
failures = []


def check(name, fn):
    try:
        fn()
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the run fails
        failures.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}")


def raw(method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


MESSAGES = [{"role": "user", "content": "Once upon a time"}]


def models():
    listed = client.models.list()
    assert [m.id for m in listed.data] == [model_id], listed


def chat():
    reply = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    again = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == reply.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0, again.usage


def chat_stream():
    stream = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=16, temperature=0, seed=3,
        stream=True, stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert pieces and finish in ("stop", "length"), (pieces, finish)
    assert usage is not None and usage.completion_tokens >= 1, usage
    whole = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=16, temperature=0, seed=3)
    assert whole.choices[0].message.content == "".join(pieces)


def completions():
    reply = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=16, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == reply.choices[0].text, (streamed, reply.choices[0].text)


def concurrent_eight():
    def one(i):
        r = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": f"Story {i}"}], max_tokens=16,
        )
        return r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(one, range(8)))
    assert all(r in ("stop", "length") for r in reasons), reasons


def malformed_json():
    status, body = raw("POST", "/v1/chat/completions", b'{"messages": [')
    assert status == 400, status
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and set(error) >= {"message", "type", "param", "code"}


def oversized_body():
    status, body = raw("POST", "/v1/chat/completions", b" " * (max_body + 1024))
    assert status == 413, status
    assert json.loads(body)["error"]["code"] == "request_too_large"


def refused_features():
    for extra in ({"response_format": {"type": "json_object"}},
                  {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}):
        try:
            client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=4, **extra)
        except openai.BadRequestError as e:
            assert "does not support" in str(e), e
        else:
            raise AssertionError(f"{extra} was accepted")


def context_too_long():
    try:
        client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=10**6)
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded", e
    else:
        raise AssertionError("an over-long request was accepted")


def disconnect_mid_stream():
    stream = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=200, stream=True, extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()


def healthy_afterwards():
    status, body = raw("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok", body
    reply = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
    status, metrics = raw("GET", "/metrics")
    assert status == 200 and b"pocketlm_requests_total" in metrics


for name, fn in [
    ("models", models), ("chat", chat), ("chat_stream", chat_stream), ("completions", completions),
    ("concurrent_eight", concurrent_eight), ("malformed_json", malformed_json),
    ("oversized_body", oversized_body), ("refused_features", refused_features),
    ("context_too_long", context_too_long), ("disconnect_mid_stream", disconnect_mid_stream),
    ("healthy_afterwards", healthy_afterwards),
]:
    check(name, fn)

print(f"openai {openai.__version__}: {len(failures)} failed" + (f" ({', '.join(failures)})" if failures else ""))
sys.exit(1 if failures else 0)
