//! The server end to end over loopback HTTP with the stories260K fixture: chat and text
//! completions with and without streaming, concurrency beyond the slots, the error shapes
//! (400, 401, 404, 413, 503), a client disconnecting mid-stream, metrics and shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pocketlm_convert::{ConvertOptions, convert_path};
use pocketlm_format::Encoding;
use pocketlm_kernels::pool::Team;
use pocketlm_runtime::Model;
use pocketlm_server::{EngineThreads, Server, ServerConfig};
use serde_json::{Value, json};

/// stories260K converted once per test process.
fn model_path() -> &'static Path {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &PATH
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("stories.plm");
            let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
                .join("tests/fixtures/stories260k/hf");
            convert_path(
                &src,
                &out,
                &ConvertOptions::with_weights(Encoding::F32),
                &mut |_, _, _| {},
            )
            .unwrap();
            (dir, out)
        })
        .1
}

/// stories260K with the Hermes-style tool-calling template of
/// `tests/fixtures/stories260k-tools` (tool definitions, assistant tool calls, tool results);
/// converted once per test process.
fn tool_model_path() -> &'static Path {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &PATH
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("hf");
            std::fs::create_dir(&src).unwrap();
            let fixture = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
                .join("tests/fixtures/stories260k/hf");
            for f in ["config.json", "model.safetensors", "tokenizer.json"] {
                std::fs::copy(fixture.join(f), src.join(f)).unwrap();
            }
            std::fs::copy(
                fixture.join("../../stories260k-tools/tokenizer_config.json"),
                src.join("tokenizer_config.json"),
            )
            .unwrap();
            let out = dir.path().join("tools.plm");
            convert_path(
                &src,
                &out,
                &ConvertOptions::with_weights(Encoding::F32),
                &mut |_, _, _| {},
            )
            .unwrap();
            (dir, out)
        })
        .1
}

/// A server on a free loopback port, on a runtime of its own; stopped (gracefully) on drop.
struct TestServer {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(config: ServerConfig) -> TestServer {
        TestServer::start_with(model_path(), config)
    }

    fn start_with(model: &Path, config: ServerConfig) -> TestServer {
        let model = Arc::new(Model::open(model).unwrap());
        let server = Server::new(model, config).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                server
                    .serve(listener, async move {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        TestServer {
            address,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Stops the server and waits until it has (in-flight responses ended).
    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn config(parallel: usize) -> ServerConfig {
    ServerConfig {
        model_id: "stories".to_string(),
        parallel,
        context_len: 256,
        max_queue: 16,
        max_body_bytes: 64 << 10,
        api_key: None,
        ..ServerConfig::default()
    }
}

fn chat_body(text: &str, max_tokens: usize) -> Value {
    json!({
        "model": "stories",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Reads an SSE body to its end: the JSON of every `data:` event before `[DONE]`, and
/// whether `[DONE]` came.
async fn read_events(response: reqwest::Response) -> (Vec<Value>, bool) {
    let text = response.text().await.unwrap();
    let mut events = Vec::new();
    let mut done = false;
    for frame in text.split("\n\n").filter(|f| !f.is_empty()) {
        let data = frame.strip_prefix("data: ").expect(frame);
        if data == "[DONE]" {
            done = true;
        } else {
            assert!(!done, "an event after [DONE]");
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    (events, done)
}

async fn assert_healthy(client: &reqwest::Client, server: &TestServer) {
    let health: Value = client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let (status, body) = post(
        client,
        &server.url("/v1/chat/completions"),
        &chat_body("Hi", 4),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn chat_completion_reports_usage_and_reuses_the_prefix() {
    let server = TestServer::start(config(1));
    let client = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    let (status, first) = post(&client, &url, &chat_body("Once upon a time", 12)).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["model"], "stories");
    let choice = &first["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let usage = &first["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(prompt > 0 && (1..=12).contains(&completion));
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);

    // The same prompt again, greedy: the same text, and the slot's cache serves the prompt.
    let (_, second) = post(&client, &url, &chat_body("Once upon a time", 12)).await;
    assert_eq!(
        second["choices"][0]["message"],
        first["choices"][0]["message"]
    );
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(cached, prompt - 1, "all but the last prompt token reused");
}

#[tokio::test]
async fn an_engine_with_its_own_pool_and_team_gives_the_same_replies() {
    // Greedy replies of two concurrent requests (one batched step holds both) from the
    // default engine and from one on its own rayon pool and decode team: the same text.
    let threaded = ServerConfig {
        engine_threads: EngineThreads {
            pool: Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(2)
                    .build()
                    .unwrap(),
            )),
            team: Some(Arc::new(Team::new(2))),
        },
        ..config(2)
    };
    let mut replies = Vec::new();
    for config in [config(2), threaded] {
        let server = TestServer::start(config);
        let client = reqwest::Client::new();
        let url = server.url("/v1/chat/completions");
        let (body_a, body_b) = (
            chat_body("Once upon a time", 24),
            chat_body("The little dog", 24),
        );
        let a = post(&client, &url, &body_a);
        let b = post(&client, &url, &body_b);
        let ((status_a, a), (status_b, b)) = tokio::join!(a, b);
        assert_eq!((status_a, status_b), (200, 200), "{a} {b}");
        replies.push([
            a["choices"][0]["message"]["content"].clone(),
            b["choices"][0]["message"]["content"].clone(),
        ]);
    }
    assert_eq!(replies[0], replies[1]);
}

#[tokio::test]
async fn chat_stream_sends_role_deltas_finish_usage_and_done() {
    let server = TestServer::start(config(1));
    let client = reqwest::Client::new();
    let mut body = chat_body("Once upon a time", 16);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (events, done) = read_events(response).await;
    assert!(done);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty());
    let finish = &events[events.len() - 2];
    assert!(finish["choices"][0]["finish_reason"].is_string());
    let usage_chunk = events.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

    // The stream says what the same request without streaming says.
    let (_, whole) = post(
        &client,
        &server.url("/v1/chat/completions"),
        &chat_body("Once upon a time", 16),
    )
    .await;
    assert_eq!(whole["choices"][0]["message"]["content"], text.as_str());
}

#[tokio::test]
async fn text_completions_stream_and_whole_with_stop_strings() {
    let server = TestServer::start(config(1));
    let client = reqwest::Client::new();
    let url = server.url("/v1/completions");
    let body = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0});
    let (status, whole) = post(&client, &url, &body).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.len() > 4, "{text:?}");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (events, done) = read_events(client.post(&url).json(&streamed).send().await.unwrap()).await;
    assert!(done);
    let joined: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(joined, text);

    // A stop string cuts the text before it.
    let cut = &text[text.len() / 2..];
    let stop = cut.split_whitespace().next().unwrap_or(cut);
    let mut stopped = body.clone();
    stopped["stop"] = json!([stop]);
    let (_, reply) = post(&client, &url, &stopped).await;
    let reply_text = reply["choices"][0]["text"].as_str().unwrap();
    assert!(!reply_text.contains(stop), "{reply_text:?} holds {stop:?}");
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn eight_concurrent_requests_on_two_slots_all_succeed() {
    let server = TestServer::start(config(2));
    let client = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    let requests = (0..8).map(|i| {
        let client = client.clone();
        let url = url.clone();
        let mut body = chat_body(&format!("Tell story number {i}"), 16);
        body["stream"] = json!(i % 2 == 0);
        tokio::spawn(async move {
            let response = client.post(&url).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        })
    });
    for request in requests {
        let text = request.await.unwrap();
        assert!(
            text.contains("\"finish_reason\":\"") || text.contains("[DONE]"),
            "{text}"
        );
    }
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains("pocketlm_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 8"),
        "{metrics}"
    );
    assert!(metrics.contains("pocketlm_time_to_first_token_seconds_count 8"));
    assert!(metrics.contains("pocketlm_slots 2"));
    assert!(metrics.contains("pocketlm_queue_depth 0"));
}

#[tokio::test]
async fn bad_requests_get_openai_error_shapes() {
    let server = TestServer::start(config(1));
    let client = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    let send_raw = |body: Vec<u8>| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let malformed = send_raw(b"{\"messages\": [".to_vec()).await.unwrap();
    assert_eq!(malformed.status(), 400);
    let error: Value = malformed.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid JSON")
    );
    assert!(error["error"].as_object().unwrap().contains_key("param"));
    assert!(error["error"].as_object().unwrap().contains_key("code"));

    let oversized = send_raw(vec![b' '; 100 << 10]).await.unwrap();
    assert_eq!(oversized.status(), 413);
    let error: Value = oversized.json().await.unwrap();
    assert_eq!(error["error"]["code"], "request_too_large");

    let cases = [
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}),
            "messages",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}),
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 3}),
            "n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "xml"}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
        ),
        // A schema the constraint engine refuses: a 400 before anything streams.
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": true,
                   "response_format": {"type": "json_schema",
                       "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "json_object"},
                   "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "response_format",
        ),
        // stories260K has no chat template to describe tools with.
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "retrieval"}]}),
            "tools",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "chat_template_kwargs": {"enable_thinking": "no"}}),
            "chat_template_kwargs",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice",
        ),
    ];
    for (body, param) in cases {
        let (status, error) = post(&client, &url, &body).await;
        assert_eq!(status, 400, "{body} → {error}");
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    let long_prompt = "once upon a time ".repeat(200);
    let (status, error) = post(&client, &url, &chat_body(&long_prompt, 8)).await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["code"], "context_length_exceeded");

    let missing = client.get(server.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_healthy(&client, &server).await;
}

#[tokio::test]
async fn api_key_is_required_except_for_health() {
    let mut with_key = config(1);
    with_key.api_key = Some("sekret".to_string());
    let server = TestServer::start(with_key);
    let client = reqwest::Client::new();
    let models = client.get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    let error: Value = models.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key");
    let wrong = client
        .get(server.url("/v1/models"))
        .bearer_auth("sekreT")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let models: Value = client
        .get(server.url("/v1/models"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "stories");
    let health = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let mut small = config(1);
    small.max_queue = 0;
    let server = TestServer::start(small);
    let client = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    // Eight long requests at once on one slot and no queue: the first runs, the ones that
    // arrive while it does are refused.
    let mut long = chat_body("Once upon a time", 200);
    long["ignore_eos"] = json!(true);
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let request = client.post(&url).json(&long).send();
            tokio::spawn(async move {
                let response = request.await.unwrap();
                let status = response.status().as_u16();
                let retry_after = response.headers().get("retry-after").cloned();
                (status, retry_after, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut refused = 0;
    for request in requests {
        let (status, retry_after, body) = request.await.unwrap();
        match status {
            200 => assert_eq!(body["usage"]["completion_tokens"], 200),
            503 => {
                refused += 1;
                assert_eq!(retry_after.unwrap(), "1");
                assert_eq!(body["error"]["code"], "server_overloaded");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    assert!(refused > 0, "no request was refused");
    assert_healthy(&client, &server).await;
}

#[tokio::test]
async fn a_client_disconnecting_mid_stream_frees_its_slot() {
    let server = TestServer::start(config(1));
    let client = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    let mut long = chat_body("Once upon a time", 200);
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    let mut response = client.post(&url).json(&long).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.chunk().await.unwrap();
    response.chunk().await.unwrap();
    drop(response);
    // The only slot is free again well before 200 tokens would have taken it.
    let started = std::time::Instant::now();
    assert_healthy(&client, &server).await;
    let metrics = loop {
        let text = client
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("pocketlm_generations_cancelled_total 1")
            || started.elapsed() > Duration::from_secs(10)
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        metrics.contains("pocketlm_generations_cancelled_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn shutdown_ends_a_running_stream_with_a_final_chunk() {
    let mut server = TestServer::start(config(1));
    let client = reqwest::Client::new();
    let mut long = chat_body("Once upon a time", 200);
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    let mut response = client
        .post(server.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Shut down once the stream is running: the role chunk comes at once, generated text only
    // once the request holds a slot (one still queued at shutdown gets an error event).
    let mut text = String::new();
    while !text.contains("\"content\":\"") || text.matches("data: ").count() < 2 {
        let chunk = response
            .chunk()
            .await
            .unwrap()
            .expect("the stream ended early");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let stopper = tokio::task::spawn_blocking(move || server.shut_down());
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    stopper.await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains("\"finish_reason\":\""), "{text}");
}

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"],
                "additionalProperties": false
            }
        }
    })
}

#[tokio::test]
async fn response_format_constrains_the_reply_whole_and_streamed() {
    let server = TestServer::start(config(1));
    let client = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "happy": {"type": "boolean"}
        },
        "required": ["name", "happy"],
        "additionalProperties": false
    });
    let mut body = chat_body("Tell me about the cat.", 80);
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": true}});
    let (status, reply) = post(&client, &url, &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["finish_reason"], "stop", "{reply}");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).expect(content);
    assert!(
        parsed["name"].as_str().unwrap().chars().count() <= 8,
        "{parsed}"
    );
    assert!(parsed["happy"].is_boolean(), "{parsed}");

    body["stream"] = json!(true);
    let response = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let (events, done) = read_events(response).await;
    assert!(done);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed, content,
        "greedy: the stream says what the whole reply said"
    );

    let mut body = chat_body("Tell me about the dog.", 60);
    body["response_format"] = json!({"type": "json_object"});
    let (status, reply) = post(&client, &url, &body).await;
    assert_eq!(status, 200, "{reply}");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    if reply["choices"][0]["finish_reason"] == "stop" {
        let parsed: Value = serde_json::from_str(content).expect(content);
        assert!(parsed.is_object(), "{parsed}");
    } else {
        // Out of tokens mid-object: what there is still starts as an object.
        assert_eq!(reply["choices"][0]["finish_reason"], "length");
        assert!(content.starts_with('{'), "{content}");
    }
}

#[tokio::test]
async fn tools_give_tool_calls_whole_and_streamed_and_take_results_back() {
    // Tool definitions take a few hundred of stories260K's (mostly one-letter) tokens.
    let server = TestServer::start_with(
        tool_model_path(),
        ServerConfig {
            context_len: 1024,
            ..config(1)
        },
    );
    let client = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    let mut body = chat_body("What is the weather in Paris?", 80);
    body["tools"] = json!([weather_tool()]);
    body["tool_choice"] = json!("required");
    let (status, reply) = post(&client, &url, &body).await;
    assert_eq!(status, 200, "{reply}");
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{reply}");
    assert!(choice["message"]["content"].is_null(), "{reply}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");

    // Naming the function forces that call too; streamed, the calls come as one delta.
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
    body["stream"] = json!(true);
    let response = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let (events, done) = read_events(response).await;
    assert!(done);
    let deltas: Vec<&Value> = events
        .iter()
        .filter(|e| !e["choices"][0]["delta"]["tool_calls"].is_null())
        .collect();
    assert_eq!(deltas.len(), 1, "{events:?}");
    let streamed_call = &deltas[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(streamed_call["index"], 0);
    assert_eq!(
        streamed_call["function"], call["function"],
        "greedy: same call"
    );
    assert!(
        events.iter().all(|e| e["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("")
            .is_empty()),
        "no call markup streamed as text: {events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");

    // The call and its result go back in (OpenAI's shapes); the reply may be text now.
    let body = json!({
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 21}"},
        ],
        "tools": [weather_tool()],
        "max_tokens": 8,
        "temperature": 0,
    });
    let (status, reply) = post(&client, &url, &body).await;
    assert_eq!(status, 200, "{reply}");
    let usage = &reply["usage"];
    assert!(
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "the slot reuses the prompt it rendered last time: {usage}"
    );
    assert_healthy(&client, &server).await;
}
