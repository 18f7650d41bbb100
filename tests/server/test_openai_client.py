"""Drives a running `pocketlm serve` with the official `openai` Python client (and raw HTTP
for what the client cannot send): models, chat and text completions with and without
streaming, usage with cached tokens, json_schema and json_object output, tools with tool
calls (whole and streamed) and their results sent back, 8 concurrent requests, malformed
JSON (400), an oversized body (413), refused parameters (400), a client disconnecting
mid-stream, and the server healthy afterwards. The model's chat template must offer tools
(scripts/test-server.sh serves stories260K with tests/fixtures/stories260k-tools).

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


CAT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "happy": {"type": "boolean"}},
    "required": ["name", "happy"],
    "additionalProperties": False,
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def json_schema():
    reply = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT_SCHEMA, "strict": True}},
    )
    assert reply.choices[0].finish_reason == "stop", reply
    cat = json.loads(reply.choices[0].message.content)
    assert isinstance(cat["name"], str) and len(cat["name"]) <= 8 and isinstance(cat["happy"], bool), cat
    assert set(cat) == {"name", "happy"}, cat


def json_object():
    reply = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=60, temperature=0, response_format={"type": "json_object"},
    )
    content = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict), content
    else:
        assert reply.choices[0].finish_reason == "length" and content.startswith("{"), reply


def tools():
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=model_id, messages=question, max_tokens=80, temperature=0, tools=[WEATHER_TOOL], tool_choice="required",
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", reply
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id, call
    assert isinstance(json.loads(call.function.arguments)["city"], str), call
    # The client sends the call back with the tool's answer.
    answer = client.chat.completions.create(
        model=model_id, max_tokens=8, temperature=0, tools=[WEATHER_TOOL],
        messages=question + [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
        ],
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls"), answer
    assert answer.usage.prompt_tokens_details.cached_tokens > 0, answer.usage


def tools_stream():
    stream = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Weather in Rome?"}], max_tokens=80, temperature=0,
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True,
    )
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            assert not choice.delta.content, f"call markup streamed as text: {choice.delta.content!r}"
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather", (finish, calls)
    assert isinstance(json.loads(calls[0]["arguments"])["city"], str), calls


def refused_parameters():
    for extra in ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
                  {"response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL]},
                  {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                  {"n": 2}):
        try:
            client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=4, **extra)
        except openai.BadRequestError as e:
            assert e.code == "invalid_parameter" or e.param, e
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
    ("oversized_body", oversized_body), ("json_schema", json_schema), ("json_object", json_object),
    ("tools", tools), ("tools_stream", tools_stream), ("refused_parameters", refused_parameters),
    ("context_too_long", context_too_long), ("disconnect_mid_stream", disconnect_mid_stream),
    ("healthy_afterwards", healthy_afterwards),
]:
    check(name, fn)

print(f"openai {openai.__version__}: {len(failures)} failed" + (f" ({', '.join(failures)})" if failures else ""))
sys.exit(1 if failures else 0)
