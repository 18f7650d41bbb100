package dev.pocketlm.sample

import android.app.Activity
import android.os.Bundle
import android.widget.ScrollView
import android.widget.TextView
import java.io.File
import uniffi.pocketlm.Engine
import uniffi.pocketlm.EngineOptions
import uniffi.pocketlm.GenerationConfig
import uniffi.pocketlm.PocketLmException
import uniffi.pocketlm.Session
import uniffi.pocketlm.TokenCallback

/** Streams a completion of "Once upon a time" into a TextView, generating on a background thread. */
class MainActivity : Activity() {
    private lateinit var text: TextView
    private var engine: Engine? = null
    private var session: Session? = null
    @Volatile private var destroyed = false

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        text = TextView(this).apply { textSize = 18f; setPadding(32, 32, 32, 32) }
        setContentView(ScrollView(this).apply { addView(text) })

        Thread {
            try {
                // mmap needs a real file: copy the asset out of the APK once.
                val model = File(filesDir, "model.plm")
                if (!model.exists()) {
                    assets.open("model.plm").use { input ->
                        model.outputStream().use { input.copyTo(it) }
                    }
                }
                val engine = Engine.open(model.path, EngineOptions(threads = 4u)).also { engine = it }
                val session = engine.newSession().also { session = it }
                val prompt = "Once upon a time"
                runOnUiThread { text.text = prompt }
                val result = session.generate(
                    prompt,
                    GenerationConfig(maxTokens = 200u, temperature = 0.7f),
                    object : TokenCallback {
                        // Runs on a pocketlm worker thread: hop to the UI thread to append.
                        override fun onToken(text: String): Boolean {
                            runOnUiThread { this@MainActivity.text.append(text) }
                            return !destroyed // returning false stops generation
                        }
                    },
                )
                val s = result.stats
                runOnUiThread {
                    text.append(
                        "\n\n[${result.stopReason}] ${s.generatedTokens} tokens, " +
                            "%.1f tok/s, first token %.0f ms".format(s.decodeTokensPerSecond, s.timeToFirstTokenMs),
                    )
                }
            } catch (e: PocketLmException) {
                runOnUiThread { text.append("\n\nerror: $e") }
            }
        }.start()
    }

    override fun onDestroy() {
        destroyed = true
        session?.cancel()
        super.onDestroy()
    }
}
