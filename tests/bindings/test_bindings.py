"""The generated Python bindings (ctypes) against the real cdylib and stories260K.

Run by scripts/test-bindings.sh:
    python3 test_bindings.py BINDINGS_DIR MODEL.plm [TOOLS_MODEL.plm]
BINDINGS_DIR holds the generated pocketlm.py with libpocketlm.so next to it. TOOLS_MODEL is
stories260K with a tool-calling chat template (tests/fixtures/stories260k-tools).
Prints "N passed, N failed" last; exits 1 on any failure.
"""

import os
import sys
import tempfile
import threading
import traceback

bindings_dir, model_path = sys.argv[1], sys.argv[2]
tools_model_path = sys.argv[3] if len(sys.argv) > 3 else None
sys.path.insert(0, bindings_dir)
import pocketlm  # noqa: E402
from pocketlm import (  # noqa: E402
    ChatMessage,
    ContextPolicy,
    Engine,
    EngineOptions,
    GenerationConfig,
    OutputConstraint,
    PocketLmError,
    StopReason,
    TokenCallback,
    Tools,
)

PROMPT = "Once upon a time"
EXPECTED = ", there was a little girl named Lily. She loved to play outside in the park."


def greedy(max_tokens, **kw):
    return GenerationConfig(max_tokens=max_tokens, temperature=0.0, **kw)


class Collect(TokenCallback):
    def __init__(self, limit=None):
        self.pieces = []
        self.limit = limit

    def on_token(self, text):
        self.pieces.append(text)
        return self.limit is None or len(self.pieces) < self.limit


class Throws(TokenCallback):
    def __init__(self):
        self.calls = 0

    def on_token(self, text):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom from python")
        return True


ENGINE = Engine.open(model_path, EngineOptions(threads=2))


# Every name KernelPath::name can report; which one depends on the CPU running the test.
KERNEL_PATHS = ("scalar", "generic", "avx2", "avxvnni", "avx512", "neon", "dotprod", "i8mm")


def test_info():
    info = ENGINE.info()
    assert info.architecture == "llama", info
    assert 200_000 < info.parameters < 300_000, info
    assert abs(info.bits_per_weight - 32.0) < 1e-9, info
    assert info.file_size_bytes == os.path.getsize(model_path), info
    assert info.vocab_size == 512 and info.context_length == 512, info
    assert info.has_chat_template is False, info
    assert info.threads == 2, info
    assert info.low_rank_percent == 100, info
    assert info.kernel_path in KERNEL_PATHS, info
    assert info.profile == "best", info
    assert 0 < info.weight_bytes <= info.file_size_bytes, info
    assert info.pinned_cores == [], info  # alike cores (or none described): no pinning


def test_cpu_mask():
    pinned = Engine.open(model_path, EngineOptions(cpu_mask="0"))
    info = pinned.info()
    assert info.pinned_cores == [0] and info.threads == 1, info
    assert pinned.new_session().complete(PROMPT, greedy(40)).text.startswith(EXPECTED)
    e = expect(PocketLmError.InvalidConfig, lambda: Engine.open(model_path, EngineOptions(cpu_mask="0xZ")))
    assert "0xZ" in e.reason, e.reason


def test_greedy_completion():
    result = ENGINE.new_session().complete(PROMPT, greedy(40))
    assert result.text.startswith(EXPECTED), repr(result.text)
    assert result.stop_reason == StopReason.MAX_TOKENS, result.stop_reason
    assert result.stats.generated_tokens == 40 and len(result.tokens) == 40
    assert result.stats.prompt_tokens == 5
    assert result.stats.decode_tokens_per_second > 0


def test_streaming_matches_result():
    cb = Collect()
    session = ENGINE.new_session()
    result = session.generate(PROMPT, greedy(40), cb)
    assert "".join(cb.pieces) == result.text
    assert result.text.startswith(EXPECTED)
    assert session.stats() == result.stats


def test_cancel_after_three_pieces():
    cb = Collect(limit=3)
    result = ENGINE.new_session().generate(PROMPT, greedy(40), cb)
    assert result.stop_reason == StopReason.CANCELLED, result.stop_reason
    assert len(cb.pieces) == 3, cb.pieces
    assert "".join(cb.pieces) == result.text
    assert EXPECTED.startswith(result.text), repr(result.text)


def test_two_sessions_two_threads():
    outputs = [None, None]

    def run(i):
        outputs[i] = ENGINE.new_session().complete(PROMPT, greedy(40)).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outputs[0] == outputs[1], outputs
    assert outputs[0].startswith(EXPECTED)


def test_count_tokens_and_reset():
    session = ENGINE.new_session()
    assert session.count_tokens(PROMPT) == 4
    first = session.complete(PROMPT, greedy(10))
    assert session.context_used() == 15
    session.reset()
    assert session.context_used() == 0
    assert session.complete(PROMPT, greedy(10)).text == first.text


def test_chat():
    cb = Collect()
    msgs = [ChatMessage(role="user", content="Tell me a story.")]
    result = ENGINE.new_session().chat(msgs, greedy(20), cb)
    assert "".join(cb.pieces) == result.text
    assert ENGINE.new_session().chat(msgs, greedy(20), None).text == result.text


def test_conversation_reuses_turns_and_saves():
    conv = ENGINE.new_conversation("You tell stories.")
    first = conv.send("Tell me about a cat.", greedy(12), None)
    assert first.stats.reused_tokens == 0
    second = conv.send("What did it eat?", greedy(12), None)
    assert second.stats.reused_tokens * 2 > second.stats.prompt_tokens, second.stats
    roles = [m.role for m in conv.messages()]
    assert roles == ["system", "user", "assistant", "user", "assistant"], roles
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "chat.session")
        assert conv.save(path) > 0
        restored = ENGINE.restore_conversation(path)
        assert restored.messages() == conv.messages()
        a = conv.send("And then?", greedy(8), None)
        b = restored.send("And then?", greedy(8), None)
        assert a.text == b.text and a.stats.reused_tokens == b.stats.reused_tokens, (a, b)
        # Another model's engine (int8 KV cache) refuses the file and says why.
        q8 = Engine.open(model_path, EngineOptions(kv_cache="q8"))
        e = expect(PocketLmError.InvalidSession, lambda: q8.restore_conversation(path))
        assert "saved as f32" in e.reason, e.reason
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 7)
        e = expect(PocketLmError.InvalidSession, lambda: ENGINE.restore_conversation(path))
        assert "truncated" in e.reason, e.reason


def test_context_policies():
    small = Engine.open(model_path, EngineOptions(context_length=96))
    conv = small.new_conversation(None)
    for i in range(6):
        r = conv.send(f"Tell me story number {i} about a cat and a dog.", greedy(16), None)
        assert r.stats.prompt_tokens + 16 <= 96, r.stats
    assert r.stats.dropped > 0, r.stats
    assert conv.messages()[-2].content.startswith("Tell me story number 5")
    strict = Engine.open(model_path, EngineOptions(context_length=96, context_policy=ContextPolicy.ERROR))
    conv = strict.new_conversation(None)
    expect(
        PocketLmError.ContextFull,
        lambda: [conv.send(f"Tell me story number {i} about a cat and a dog.", greedy(16), None) for i in range(6)],
    )
    session = small.new_session()
    session.set_context_policy(ContextPolicy.TRUNCATE_START)
    r = session.complete("Once upon a time there was a cat. " * 20, greedy(8))
    assert r.stats.dropped > 0 and r.stats.prompt_tokens == 96 - 8, r.stats


SCHEMA = (
    '{"type":"object","properties":{"name":{"type":"string","maxLength":10},'
    '"age":{"type":"integer","minimum":0,"maximum":120}},"required":["name","age"],'
    '"additionalProperties":false}'
)


def test_constrained_output():
    import json

    r = ENGINE.new_session().complete(PROMPT, greedy(100, constraint=OutputConstraint.JSON_SCHEMA(schema=SCHEMA)))
    assert r.stop_reason == StopReason.CONSTRAINT_COMPLETE, r
    value = json.loads(r.text)
    assert set(value) == {"name", "age"} and 0 <= value["age"] <= 120, value
    r = ENGINE.new_session().complete(PROMPT, greedy(3, constraint=OutputConstraint.JSON_SCHEMA(schema=SCHEMA)))
    assert r.stop_reason == StopReason.CONSTRAINT_INCOMPLETE, r
    r = ENGINE.new_session().complete("Lily saw", greedy(8, constraint=OutputConstraint.CHOICE(choices=["a cat", "a dog"])))
    assert r.text in ("a cat", "a dog"), r
    e = expect(
        PocketLmError.InvalidConfig,
        lambda: ENGINE.new_session().complete(PROMPT, greedy(8, constraint=OutputConstraint.GBNF(grammar="root ::= ("))),
    )
    assert "GBNF" in e.reason, e.reason


def test_tools_need_a_template():
    # stories260K ships no chat template, so there is nothing to render tools with; the
    # runtime's tests cover a templated model's calls end to end.
    tool = '{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}'
    conv = ENGINE.new_conversation(None)
    e = expect(PocketLmError.InvalidConfig, lambda: conv.send_with_tools("Hi", Tools(definitions=[tool], require_call=True), greedy(8), None))
    assert "template" in e.reason, e.reason
    e = expect(PocketLmError.InvalidConfig, lambda: conv.send_with_tools("Hi", Tools(definitions=["{"], require_call=False), greedy(8), None))
    assert "tool definition 0" in e.reason, e.reason
    assert conv.messages() == [], "a refused turn leaves no trace"
    r = conv.send("Hi", greedy(4), None)
    assert r.tool_calls == [] and r.tool_call_error is None, r


# `strict` closes the parameters' objects (the Kotlin suite says additionalProperties itself);
# an open object would let a tiny model go on adding keys until max_tokens.
WEATHER_TOOL = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",'
    ' "strict": true, "parameters": {"type": "object", "properties": {"city": {"type": "string",'
    ' "maxLength": 12}}, "required": ["city"]}}}'
)


def test_tool_call_through_the_template():
    # The model's own template renders the tool; a required call constrains the reply to one
    # call matching the tool's schema, which comes back parsed.
    if tools_model_path is None:
        raise AssertionError("no tool-template model given (third argument)")
    engine = Engine.open(tools_model_path, EngineOptions(threads=2))
    conv = engine.new_conversation("You can call tools.")
    r = conv.send_with_tools("What is the weather in Paris?", Tools(definitions=[WEATHER_TOOL], require_call=True), greedy(96), None)
    assert r.tool_call_error is None, r
    assert len(r.tool_calls) == 1, r
    call = r.tool_calls[0]
    assert call.name == "get_weather", call
    import json
    args = json.loads(call.arguments_json)
    assert isinstance(args, dict) and isinstance(args.get("city"), str), args
    # The call is in the transcript; a tool result goes back and the model answers in text.
    assert conv.messages()[-1].role == "assistant", conv.messages()
    conv.add_message(ChatMessage(role="tool", content='{"temperature": 21}'))
    reply = conv.reply(None, greedy(8), None)
    assert reply.tool_calls == [], reply


def test_stop_string():
    result = ENGINE.new_session().complete(PROMPT, greedy(40, stop=["Lily"]))
    assert result.stop_reason == StopReason.STOP_STRING
    assert result.text == ", there was a little girl named ", repr(result.text)


def expect(error_class, fn):
    try:
        fn()
    except error_class as e:
        return e
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"expected {error_class.__name__}, got {type(e).__name__}: {e}")
    raise AssertionError(f"expected {error_class.__name__}, nothing raised")


def test_missing_file():
    e = expect(PocketLmError.FileNotFound, lambda: Engine.open("/nonexistent/x.plm", EngineOptions()))
    assert e.path == "/nonexistent/x.plm", e.path


def test_corrupt_files():
    with tempfile.TemporaryDirectory() as d:
        garbage = os.path.join(d, "garbage.plm")
        with open(garbage, "wb") as f:
            f.write(b"\x42" * 4096)
        expect(PocketLmError.InvalidModel, lambda: Engine.open(garbage, EngineOptions()))
        truncated = os.path.join(d, "truncated.plm")
        with open(model_path, "rb") as f:
            data = f.read()
        with open(truncated, "wb") as f:
            f.write(data[: len(data) // 2])
        e = expect(PocketLmError.InvalidModel, lambda: Engine.open(truncated, EngineOptions()))
        assert "truncated" in e.reason, e.reason


def test_bad_configs():
    session = ENGINE.new_session()
    e = expect(PocketLmError.InvalidConfig, lambda: session.complete(PROMPT, GenerationConfig(top_p=-1.0)))
    assert "top_p" in e.reason, e.reason
    expect(
        PocketLmError.InvalidConfig,
        lambda: Engine.open(model_path, EngineOptions(kernel_path="quantum")),
    )
    expect(PocketLmError.InvalidConfig, lambda: Engine.open(model_path, EngineOptions(profile="huge")))
    e = expect(PocketLmError.InvalidConfig, lambda: Engine.open(model_path, EngineOptions(max_weight_bytes=1000)))
    assert "limit" in e.reason, e.reason


def test_context_full():
    tiny = Engine.open(model_path, EngineOptions(context_length=8)).new_session()
    expect(PocketLmError.ContextFull, lambda: tiny.complete("Once upon a time there was a cat and a dog.", greedy(4)))


def test_throwing_callback():
    cb = Throws()
    session = ENGINE.new_session()
    e = expect(PocketLmError.CallbackFailed, lambda: session.generate(PROMPT, greedy(40), cb))
    assert "boom from python" in e.reason, e.reason
    assert cb.calls == 2
    session.reset()
    assert session.complete(PROMPT, greedy(40)).text.startswith(EXPECTED)


def test_defaults():
    c = pocketlm.default_generation_config()
    d = GenerationConfig()
    assert (c.max_tokens, c.top_k, c.seed, c.stop) == (d.max_tokens, d.top_k, d.seed, d.stop) == (256, 40, 0, [])
    # Rust's f32 0.8 comes back as 0.800000011920929: compare at f32 precision.
    for field in ("temperature", "top_p", "min_p", "repetition_penalty"):
        assert abs(getattr(c, field) - getattr(d, field)) < 1e-6, field


def main():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    passed = failed = 0
    for name, fn in tests:
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


main()
