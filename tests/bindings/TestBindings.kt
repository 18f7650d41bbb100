// The generated Kotlin bindings (JNA) against the real cdylib and stories260K, on the host JVM.
//
// Run by scripts/test-bindings.sh:
//   java -Duniffi.component.pocketlm.libraryOverride=/path/libpocketlm.so \
//        -cp test.jar:jna.jar TestBindingsKt MODEL.plm
// Prints "N passed, N failed" last; exits 1 on any failure.

import java.io.File
import java.util.concurrent.atomic.AtomicInteger
import kotlin.concurrent.thread
import kotlin.system.exitProcess
import uniffi.pocketlm.*

const val PROMPT = "Once upon a time"
const val EXPECTED = ", there was a little girl named Lily. She loved to play outside in the park."

fun greedy(maxTokens: Int, stop: List<String> = emptyList()) =
    GenerationConfig(maxTokens = maxTokens.toUInt(), temperature = 0.0f, stop = stop)

class Collect(private val limit: Int = Int.MAX_VALUE) : TokenCallback {
    val pieces = java.util.Collections.synchronizedList(mutableListOf<String>())
    override fun onToken(text: String): Boolean {
        pieces.add(text)
        return pieces.size < limit
    }
    fun text() = pieces.joinToString("")
}

class Throws : TokenCallback {
    val calls = AtomicInteger(0)
    override fun onToken(text: String): Boolean {
        if (calls.incrementAndGet() == 2) throw IllegalStateException("boom from kotlin")
        return true
    }
}

fun check(cond: Boolean, msg: () -> String = { "check failed" }) {
    if (!cond) throw AssertionError(msg())
}

inline fun <reified E : Throwable> expect(block: () -> Unit): E {
    try {
        block()
    } catch (e: Throwable) {
        if (e is E) return e
        throw AssertionError("expected ${E::class.simpleName}, got $e")
    }
    throw AssertionError("expected ${E::class.simpleName}, nothing thrown")
}

// Every name KernelPath::name can report; which one depends on the CPU running the test.
val KERNEL_PATHS = setOf("scalar", "generic", "avx2", "avxvnni", "avx512", "neon", "dotprod", "i8mm")

fun main(args: Array<String>) {
    val modelPath = args[0]
    val engine = Engine.open(modelPath, EngineOptions(threads = 2u))
    val tests = linkedMapOf<String, () -> Unit>()

    tests["info"] = {
        val info = engine.info()
        check(info.architecture == "llama") { "$info" }
        check(info.parameters in 200_000uL..300_000uL) { "$info" }
        check(Math.abs(info.bitsPerWeight - 32.0) < 1e-9) { "$info" }
        check(info.fileSizeBytes == File(modelPath).length().toULong()) { "$info" }
        check(info.vocabSize == 512u && info.contextLength == 512u) { "$info" }
        check(!info.hasChatTemplate && info.threads == 2u) { "$info" }
        check(info.kernelPath in KERNEL_PATHS) { "$info" }
        check(info.lowRankPercent.toInt() == 100) { "$info" }
        check(info.profile == "best" && info.weightBytes in 1uL..info.fileSizeBytes) { "$info" }
    }
    tests["greedy completion"] = {
        engine.newSession().use { session ->
            val r = session.complete(PROMPT, greedy(40))
            check(r.text.startsWith(EXPECTED)) { r.text }
            check(r.stopReason == StopReason.MAX_TOKENS) { "${r.stopReason}" }
            check(r.stats.generatedTokens == 40u && r.tokens.size == 40) { "${r.stats}" }
            check(r.stats.promptTokens == 5u) { "${r.stats}" }
            check(session.stats() == r.stats)
        }
    }
    tests["streaming matches the result"] = {
        val cb = Collect()
        val r = engine.newSession().generate(PROMPT, greedy(40), cb)
        check(cb.text() == r.text) { "${cb.pieces} vs ${r.text}" }
        check(r.text.startsWith(EXPECTED)) { r.text }
    }
    tests["cancel after three pieces"] = {
        val cb = Collect(limit = 3)
        val r = engine.newSession().generate(PROMPT, greedy(40), cb)
        check(r.stopReason == StopReason.CANCELLED) { "${r.stopReason}" }
        check(cb.pieces.size == 3) { "${cb.pieces}" }
        check(EXPECTED.startsWith(r.text) && cb.text() == r.text) { r.text }
    }
    tests["two sessions on two threads"] = {
        val out = arrayOfNulls<String>(2)
        val errors = java.util.Collections.synchronizedList(mutableListOf<Throwable>())
        val threads = (0..1).map { i ->
            thread {
                try {
                    out[i] = engine.newSession().complete(PROMPT, greedy(40)).text
                } catch (e: Throwable) {
                    errors.add(e)
                }
            }
        }
        threads.forEach { it.join() }
        check(errors.isEmpty()) { "$errors" }
        check(out[0] == out[1]) { out.toList().toString() }
        check(out[0]!!.startsWith(EXPECTED)) { out[0]!! }
    }
    tests["count_tokens and reset"] = {
        val session = engine.newSession()
        check(session.countTokens(PROMPT) == 4u)
        val first = session.complete(PROMPT, greedy(10))
        check(session.contextUsed() == 15u) { "${session.contextUsed()}" }
        session.reset()
        check(session.contextUsed() == 0u)
        check(session.complete(PROMPT, greedy(10)).text == first.text)
    }
    tests["chat"] = {
        val msgs = listOf(ChatMessage(role = "user", content = "Tell me a story."))
        val cb = Collect()
        val r = engine.newSession().chat(msgs, greedy(20), cb)
        check(cb.text() == r.text)
        check(engine.newSession().chat(msgs, greedy(20), null).text == r.text)
    }
    tests["conversation reuses turns, saves and restores"] = {
        val conv = engine.newConversation("You tell stories.")
        val first = conv.send("Tell me about a cat.", greedy(12), null)
        check(first.stats.reusedTokens == 0u)
        val second = conv.send("What did it eat?", greedy(12), null)
        check(second.stats.reusedTokens * 2u > second.stats.promptTokens) { "${second.stats}" }
        check(conv.messages().map { it.role } == listOf("system", "user", "assistant", "user", "assistant"))
        val dir = kotlin.io.path.createTempDirectory("pocketlm").toFile()
        try {
            val path = File(dir, "chat.session").path
            check(conv.save(path) > 0uL)
            val restored = engine.restoreConversation(path)
            check(restored.messages() == conv.messages())
            val a = conv.send("And then?", greedy(8), null)
            val b = restored.send("And then?", greedy(8), null)
            check(a.text == b.text && a.stats.reusedTokens == b.stats.reusedTokens) { "$a vs $b" }
            val q8 = Engine.open(modelPath, EngineOptions(kvCache = "q8"))
            val e = expect<PocketLmException.InvalidSession> { q8.restoreConversation(path) }
            check(e.reason.contains("saved as f32")) { e.reason }
        } finally {
            dir.deleteRecursively()
        }
    }
    tests["context policies"] = {
        val small = Engine.open(modelPath, EngineOptions(contextLength = 96u))
        val conv = small.newConversation(null)
        var last: GenerationResult? = null
        for (i in 0 until 6) {
            last = conv.send("Tell me story number $i about a cat and a dog.", greedy(16), null)
            check(last.stats.promptTokens + 16u <= 96u) { "${last.stats}" }
        }
        check(last!!.stats.dropped > 0u) { "${last.stats}" }
        val strict = Engine.open(modelPath, EngineOptions(contextLength = 96u, contextPolicy = ContextPolicy.ERROR))
        val strictConv = strict.newConversation(null)
        expect<PocketLmException.ContextFull> {
            for (i in 0 until 6) strictConv.send("Tell me story number $i about a cat and a dog.", greedy(16), null)
        }
        val session = small.newSession()
        session.setContextPolicy(ContextPolicy.TRUNCATE_START)
        val r = session.complete("Once upon a time there was a cat. ".repeat(20), greedy(8))
        check(r.stats.dropped > 0u && r.stats.promptTokens == 88u) { "${r.stats}" }
    }
    tests["cpu mask"] = {
        val pinned = Engine.open(modelPath, EngineOptions(cpuMask = "0"))
        check(pinned.info().pinnedCores == listOf(0u) && pinned.info().threads == 1u) { "${pinned.info()}" }
        check(pinned.newSession().complete(PROMPT, greedy(40)).text.startsWith(EXPECTED))
        val e = expect<PocketLmException.InvalidConfig> { Engine.open(modelPath, EngineOptions(cpuMask = "0xZ")) }
        check(e.reason.contains("0xZ")) { e.reason }
    }
    tests["constrained output"] = {
        val schema = """{"type":"object","properties":{"name":{"type":"string","maxLength":10},""" +
            """"age":{"type":"integer","minimum":0,"maximum":120}},"required":["name","age"],"additionalProperties":false}"""
        val cfg = GenerationConfig(maxTokens = 100u, temperature = 0.0f, constraint = OutputConstraint.JsonSchema(schema))
        val r = engine.newSession().complete(PROMPT, cfg)
        check(r.stopReason == StopReason.CONSTRAINT_COMPLETE) { "$r" }
        check(r.text.startsWith("{\"name\": ") && r.text.endsWith("}")) { r.text }
        val short = engine.newSession().complete(PROMPT, cfg.copy(maxTokens = 3u))
        check(short.stopReason == StopReason.CONSTRAINT_INCOMPLETE) { "$short" }
        val choice = GenerationConfig(maxTokens = 8u, temperature = 0.0f, constraint = OutputConstraint.Choice(listOf("a cat", "a dog")))
        val c = engine.newSession().complete("Lily saw", choice)
        check(c.text == "a cat" || c.text == "a dog") { c.text }
        val bad = GenerationConfig(constraint = OutputConstraint.Gbnf("root ::= ("))
        val e = expect<PocketLmException.InvalidConfig> { engine.newSession().complete(PROMPT, bad) }
        check(e.reason.contains("GBNF")) { e.reason }
    }
    tests["tool call through the template"] = {
        // stories260K with a Hermes tool template (tests/fixtures/stories260k-tools): the
        // template renders the tool, a required call constrains the reply to one call that
        // matches the tool's schema, and it comes back parsed.
        val toolsPath = args.getOrNull(1) ?: throw AssertionError("no tool-template model (second argument)")
        val tools = Engine.open(toolsPath, EngineOptions(threads = 2u))
        val weather = """{"type":"function","function":{"name":"get_weather","description":"Weather in a city",""" +
            """"parameters":{"type":"object","properties":{"city":{"type":"string","maxLength":12}},""" +
            """"required":["city"],"additionalProperties":false}}}"""
        tools.newConversation("You can call tools.").use { conv ->
            val r = conv.sendWithTools("What is the weather in Paris?", Tools(listOf(weather), true), greedy(96), null)
            check(r.toolCallError == null && r.toolCalls.size == 1) { "$r" }
            check(r.toolCalls[0].name == "get_weather") { "${r.toolCalls}" }
            check(Regex("\\{\\s*\"city\"\\s*:\\s*\".*\"\\s*\\}").matches(r.toolCalls[0].argumentsJson)) { r.toolCalls[0].argumentsJson }
            conv.addMessage(ChatMessage(role = "tool", content = "{\"temperature\": 21}"))
            val reply = conv.reply(null, greedy(8), null)
            check(reply.toolCalls.isEmpty()) { "$reply" }
        }
    }
    tests["stop string"] = {
        val r = engine.newSession().complete(PROMPT, greedy(40, stop = listOf("Lily")))
        check(r.stopReason == StopReason.STOP_STRING) { "${r.stopReason}" }
        check(r.text == ", there was a little girl named ") { r.text }
    }
    tests["missing file -> FileNotFound"] = {
        val e = expect<PocketLmException.FileNotFound> { Engine.open("/nonexistent/x.plm", EngineOptions()) }
        check(e.path == "/nonexistent/x.plm") { e.path }
    }
    tests["corrupt files -> InvalidModel"] = {
        val dir = kotlin.io.path.createTempDirectory("pocketlm").toFile()
        try {
            val garbage = File(dir, "garbage.plm").apply { writeBytes(ByteArray(4096) { 0x42 }) }
            expect<PocketLmException.InvalidModel> { Engine.open(garbage.path, EngineOptions()) }
            val bytes = File(modelPath).readBytes()
            val truncated = File(dir, "truncated.plm").apply { writeBytes(bytes.copyOf(bytes.size / 2)) }
            val e = expect<PocketLmException.InvalidModel> { Engine.open(truncated.path, EngineOptions()) }
            check(e.reason.contains("truncated")) { e.reason }
        } finally {
            dir.deleteRecursively()
        }
    }
    tests["bad configs -> InvalidConfig"] = {
        val session = engine.newSession()
        val e = expect<PocketLmException.InvalidConfig> { session.complete(PROMPT, GenerationConfig(topP = -1.0f)) }
        check(e.reason.contains("top_p")) { e.reason }
        expect<PocketLmException.InvalidConfig> { Engine.open(modelPath, EngineOptions(kernelPath = "quantum")) }
        expect<PocketLmException.InvalidConfig> { Engine.open(modelPath, EngineOptions(profile = "huge")) }
        val limit = expect<PocketLmException.InvalidConfig> { Engine.open(modelPath, EngineOptions(maxWeightBytes = 1000uL)) }
        check(limit.reason.contains("limit")) { limit.reason }
    }
    tests["context full"] = {
        val tiny = Engine.open(modelPath, EngineOptions(contextLength = 8u)).newSession()
        expect<PocketLmException.ContextFull> { tiny.complete("Once upon a time there was a cat and a dog.", greedy(4)) }
    }
    tests["throwing callback -> CallbackFailed"] = {
        val cb = Throws()
        val session = engine.newSession()
        val e = expect<PocketLmException.CallbackFailed> { session.generate(PROMPT, greedy(40), cb) }
        check(e.reason.contains("boom from kotlin")) { e.reason }
        check(cb.calls.get() == 2) { "${cb.calls.get()} calls" }
        session.reset()
        check(session.complete(PROMPT, greedy(40)).text.startsWith(EXPECTED))
    }
    tests["defaults"] = {
        val c = defaultGenerationConfig()
        check(c == GenerationConfig()) { "$c vs ${GenerationConfig()}" }
        check(c.maxTokens == 256u && c.topK == 40u && c.seed == 0uL && c.stop.isEmpty()) { "$c" }
    }

    var passed = 0
    var failed = 0
    for ((name, test) in tests) {
        try {
            test()
            passed++
            println("ok   $name")
        } catch (e: Throwable) {
            failed++
            println("FAIL $name: $e")
            e.printStackTrace(System.out)
        }
    }
    engine.close()
    println("$passed passed, $failed failed")
    exitProcess(if (failed == 0) 0 else 1)
}
