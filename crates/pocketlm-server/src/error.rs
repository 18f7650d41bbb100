//! Errors: what the library returns to its caller ([`ServerError`]) and what a client sees
//! ([`ApiError`], in OpenAI's error shape so that its clients raise the right exception).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pocketlm_runtime::ModelError;
use serde::Serialize;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid server configuration: {0}")]
    Config(&'static str),
    #[error("slot {slot}: {source}")]
    Slot {
        slot: usize,
        #[source]
        source: ModelError,
    },
    #[error("cannot start slot thread {slot}: {source}")]
    Thread {
        slot: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// An error response: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (503 when the queue is full).
    pub retry_after_seconds: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_seconds: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the offending request field.
    pub fn invalid_param(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param),
            ..ApiError::invalid_request(message)
        }
    }

    /// 400 for a field this server understands but does not implement yet.
    pub fn unsupported(param: &'static str, what: &str) -> ApiError {
        ApiError {
            code: Some("unsupported_parameter"),
            ..ApiError::invalid_param(param, format!("this server does not support {what} yet"))
        }
    }

    pub fn context_length_exceeded(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("context_length_exceeded"),
            param: Some("messages"),
            ..ApiError::invalid_request(message)
        }
    }

    pub fn payload_too_large(limit_bytes: usize) -> ApiError {
        ApiError {
            code: Some("request_too_large"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "the request body is larger than the server's limit of {limit_bytes} bytes"
                ),
            )
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or incorrect API key (send it as 'Authorization: Bearer KEY')",
            )
        }
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError {
            code: Some("unknown_url"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("unknown URL: {path}"),
            )
        }
    }

    /// 503 with `Retry-After`: every slot is busy and the queue is full.
    pub fn overloaded() -> ApiError {
        ApiError {
            code: Some("server_overloaded"),
            retry_after_seconds: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "every slot is busy and the request queue is full; retry later",
            )
        }
    }

    pub fn shutting_down() -> ApiError {
        ApiError {
            code: Some("server_shutting_down"),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON body, also sent as an SSE event when a stream fails after it started.
    pub fn body(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: Option<&'a str>,
        }
        serde_json::json!({ "error": Inner {
            message: &self.message,
            kind: self.kind,
            param: self.param,
            code: self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A runtime error met while preparing or running a request: the prompt's fault (400) or
/// the server's (500).
impl From<ModelError> for ApiError {
    fn from(error: ModelError) -> ApiError {
        match error {
            ModelError::ContextFull { .. } | ModelError::LatestTurnTooLong { .. } => {
                ApiError::context_length_exceeded(error.to_string())
            }
            ModelError::Tokenizer(_)
            | ModelError::EmptyPrompt
            | ModelError::InvalidToken { .. }
            | ModelError::Constraint(_)
            | ModelError::ConstraintsUnavailable
            | ModelError::NoToolTemplate
            | ModelError::ToolDefinition(_) => ApiError::invalid_request(error.to_string()),
            other => ApiError::internal(other.to_string()),
        }
    }
}
