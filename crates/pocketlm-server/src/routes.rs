//! The HTTP surface: routes, middleware (API key, request metrics, body limit) and the
//! handlers that turn OpenAI requests into scheduler jobs and job events into responses.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pocketlm_runtime::constrain::{Constraint, ConstraintError, OutputConstraint};
use pocketlm_runtime::session::chat_prompt_tokens;
use pocketlm_runtime::{Generation, Model, ModelError};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::{
    ChatCompletionRequest, CompletionRequest, DEFAULT_COMPLETION_MAX_TOKENS, Endpoint, Prepared,
    ResponseBuilder, Usage, generation_finish_reason,
};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::scheduler::{Job, JobEvent, Prompt, Scheduler, SubmitError};

/// What every handler shares.
pub struct AppState {
    pub model: Arc<Model>,
    pub scheduler: Arc<Scheduler>,
    pub metrics: Arc<Metrics>,
    pub model_id: String,
    /// Positions of each slot's KV cache (prompt plus reply must fit).
    pub context_len: usize,
    pub max_body_bytes: usize,
    pub api_key: Option<String>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_api_key,
        ))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            count_response,
        ))
        .with_state(state)
}

/// A bounded label for the request counter (unknown paths are one series).
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

async fn count_response(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(request.uri().path());
    let response = next.run(request).await;
    state
        .metrics
        .record_response(route, response.status().as_u16());
    response
}

/// With `--api-key`, every route but `/health` wants `Authorization: Bearer KEY`.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.api_key
        && request.uri().path() != "/health"
    {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Compares without an early exit, so the time taken does not tell how much of a guessed
/// key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(request.uri().path())
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let gauges = state.scheduler.gauges();
    let (status, text) = if state.scheduler.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    } else {
        (StatusCode::OK, "ok")
    };
    let body = serde_json::json!({
        "status": text,
        "slots": gauges.slots,
        "slots_busy": gauges.busy_slots,
        "queue_depth": gauges.queue_depth,
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(state.scheduler.gauges());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "pocketlm",
            "context_length": state.context_len,
        }],
    }))
}

/// The body as JSON of type `T`: 413 past the size limit, 400 when it does not parse.
fn parse_body<T: DeserializeOwned>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(state.max_body_bytes)
        } else {
            ApiError::invalid_request(rejection.body_text())
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received_at = Instant::now();
    let run = async {
        let request: ChatCompletionRequest = parse_body(&state, body)?;
        let chat = request.chat()?;
        let mut prepared = request.sampling.prepare(None)?;
        prepared.options.constraint = chat.constraint;
        prepared.options.enable_thinking = chat.enable_thinking;
        let prompt = Prompt::Chat {
            messages: chat.messages,
            tools: chat.tools,
        };
        generate(&state, Endpoint::Chat, prompt, prepared, received_at).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received_at = Instant::now();
    let run = async {
        let request: CompletionRequest = parse_body(&state, body)?;
        let prompt = request.prompt()?;
        let prepared = request
            .sampling
            .prepare(Some(DEFAULT_COMPLETION_MAX_TOKENS))?;
        generate(
            &state,
            Endpoint::Completions,
            Prompt::Text(prompt),
            prepared,
            received_at,
        )
        .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// Tokenizes the prompt off the async workers, checks that prompt and reply fit the
/// context, queues the job and answers as a stream or as one body.
async fn generate(
    state: &AppState,
    endpoint: Endpoint,
    prompt: Prompt,
    mut prepared: Prepared,
    received_at: Instant,
) -> Result<Response, ApiError> {
    let model = Arc::clone(&state.model);
    let constraint = prepared.options.constraint.clone();
    let enable_thinking = prepared.options.enable_thinking;
    let (prompt, prompt_tokens) = tokio::task::spawn_blocking(move || {
        let checked = check_constraint(&model, constraint.as_ref())
            .and_then(|()| prompt_tokens(&model, &prompt, enable_thinking));
        (prompt, checked)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?;
    let prompt_tokens = prompt_tokens?;
    // A reply that may be tool calls is sent once whole, so that a stream never shows a
    // call's markup as text.
    let hold_text = matches!(&prompt, Prompt::Chat { tools, .. } if !tools.definitions.is_empty());
    let context = state.context_len;
    let needed = prompt_tokens.len();
    if needed == 0 {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    let max_tokens = match prepared.max_tokens {
        Some(max) if needed.saturating_add(max) > context => {
            return Err(ApiError::context_length_exceeded(format!(
                "this server's context is {context} tokens per request, but {} tokens were \
                 requested ({needed} in the prompt, {max} for the completion); shorten the \
                 prompt or lower max_tokens",
                needed.saturating_add(max)
            )));
        }
        Some(max) => max,
        None if needed >= context => {
            return Err(ApiError::context_length_exceeded(format!(
                "this server's context is {context} tokens per request and the prompt alone \
                 takes {needed}, leaving no room for the completion"
            )));
        }
        None => context - needed,
    };
    prepared.options.max_tokens = max_tokens;

    let (events, mut received) = mpsc::unbounded_channel();
    let job = Job {
        prompt,
        prompt_tokens,
        options: prepared.options,
        events,
        received_at,
    };
    state.scheduler.submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::overloaded(),
        SubmitError::ShuttingDown => ApiError::shutting_down(),
    })?;

    let builder = ResponseBuilder::new(endpoint, &state.model_id);
    if prepared.stream {
        return Ok(stream_response(
            builder,
            received,
            prepared.include_usage,
            hold_text,
        ));
    }
    // Dropping `received` (this future, when the client goes away) cancels the generation.
    while let Some(event) = received.recv().await {
        match event {
            JobEvent::Text(_) => {}
            JobEvent::Finished(generation) => {
                let body = builder.response(&generation, usage(&generation));
                return Ok(Json(body).into_response());
            }
            JobEvent::Failed(error) => return Err(error.into()),
            JobEvent::Dropped => return Err(ApiError::shutting_down()),
        }
    }
    Err(ApiError::internal(
        "the slot stopped without finishing the request",
    ))
}

/// Compiles `response_format`'s constraint once before the request is queued, so that an
/// invalid schema is a 400 rather than an error inside a stream that already said 200.
fn check_constraint(model: &Model, constraint: Option<&OutputConstraint>) -> Result<(), ApiError> {
    let Some(constraint) = constraint else {
        return Ok(());
    };
    let invalid = |e: ConstraintError| ApiError::invalid_param("response_format", e.to_string());
    let vocabulary = model.constraint_vocabulary().map_err(invalid)?;
    Constraint::new(&vocabulary, constraint).map_err(invalid)?;
    Ok(())
}

/// The prompt's tokens exactly as the slot's session will compute them.
fn prompt_tokens(
    model: &Model,
    prompt: &Prompt,
    enable_thinking: Option<bool>,
) -> Result<Vec<u32>, ApiError> {
    let tokens = match prompt {
        Prompt::Chat { messages, tools } => {
            if !tools.definitions.is_empty() && model.tokenizer_spec().chat_template.is_none() {
                return Err(ApiError::invalid_param(
                    "tools",
                    ModelError::NoToolTemplate.to_string(),
                ));
            }
            chat_prompt_tokens(model, messages, &tools.definitions, enable_thinking)?
        }
        Prompt::Text(text) => model
            .tokenizer()
            .encode_prompt(text)
            .map_err(ModelError::from)?,
    };
    Ok(tokens)
}

fn usage(generation: &Generation) -> Usage {
    let stats = &generation.stats;
    Usage::new(
        stats.prompt_tokens,
        stats.reused_tokens,
        stats.generated_tokens,
    )
}

fn sse_frame(value: &serde_json::Value) -> String {
    format!("data: {value}\n\n")
}

const SSE_DONE: &str = "data: [DONE]\n\n";

/// Server-sent events: a chunk per piece of text, a last chunk with the finish reason, the
/// usage chunk when asked for, then `data: [DONE]`. With `hold_text` (tools offered) the
/// reply comes whole at the end: as one content chunk, or as a chunk of tool calls. When
/// the client disconnects the body stream is dropped, which closes the job's channel and
/// cancels the generation.
fn stream_response(
    builder: ResponseBuilder,
    received: mpsc::UnboundedReceiver<JobEvent>,
    include_usage: bool,
    hold_text: bool,
) -> Response {
    let opening = match builder.endpoint {
        Endpoint::Chat => sse_frame(&builder.chunk("", true, None)),
        Endpoint::Completions => String::new(),
    };
    let events = UnboundedReceiverStream::new(received).map(move |event| match event {
        JobEvent::Text(_) if hold_text => String::new(),
        JobEvent::Text(text) => sse_frame(&builder.chunk(&text, false, None)),
        JobEvent::Finished(generation) => {
            let mut frames = String::new();
            if hold_text && !generation.tool_calls.is_empty() {
                frames.push_str(&sse_frame(
                    &builder.tool_calls_chunk(&generation.tool_calls),
                ));
            } else if hold_text && !generation.text.is_empty() {
                frames.push_str(&sse_frame(&builder.chunk(&generation.text, false, None)));
            }
            let finish = generation_finish_reason(&generation);
            frames.push_str(&sse_frame(&builder.chunk("", false, Some(finish))));
            if include_usage {
                frames.push_str(&sse_frame(&builder.usage_chunk(usage(&generation))));
            }
            frames.push_str(SSE_DONE);
            frames
        }
        JobEvent::Failed(error) => {
            let error = ApiError::from(error);
            format!("{}{SSE_DONE}", sse_frame(&error.body()))
        }
        JobEvent::Dropped => {
            format!("{}{SSE_DONE}", sse_frame(&ApiError::shutting_down().body()))
        }
    });
    let body = tokio_stream::once(opening)
        .chain(events)
        .filter(|frame| !frame.is_empty())
        .map(|frame| Ok::<_, Infallible>(Bytes::from(frame)));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}
