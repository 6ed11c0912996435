//! An OpenAI-compatible stand-in: `/v1/models` and `/v1/chat/completions`, streaming (SSE) or
//! not, `usage` counts, an optional bearer key, and a configurable set of accepted
//! `response_format` types, so it can act like llama-server or vLLM (`json_schema`),
//! llama-cpp-python's server (`json_object` with `schema`; `json_schema` refused with HTTP 500 and
//! a validation message), or a server with no structured output at all (HTTP 400).
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{answer_for, count_tokens, pieces, Faults, Load, Seen, StandinConfig};

/// Which structured-output requests the stand-in accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Accepts `json_schema` and `json_object` (llama-server, vLLM, LM Studio).
    Full,
    /// Accepts `json_object` with `schema`; refuses `json_schema` with 500 (llama-cpp-python).
    LlamaCppPython,
    /// Refuses any `response_format` with 400.
    PlainOnly,
}

/// Shared state of a running stand-in.
#[derive(Debug)]
pub struct OpenAiState {
    /// Its configuration.
    pub config: StandinConfig,
    /// Structured-output behaviour.
    pub flavour: Flavour,
    /// Bearer key required, if any.
    pub api_key: Option<String>,
    /// Faults to inject.
    pub faults: Faults,
    /// What it saw.
    pub seen: Seen,
    load: Load,
}

/// A running stand-in; stops when dropped.
#[derive(Debug)]
pub struct OpenAiStandin {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// Its state.
    pub state: Arc<OpenAiState>,
    task: tokio::task::JoinHandle<()>,
}

impl OpenAiStandin {
    /// Starts a stand-in on 127.0.0.1 at a free port.
    pub async fn start(
        config: StandinConfig,
        flavour: Flavour,
        api_key: Option<String>,
    ) -> std::io::Result<Self> {
        let state = Arc::new(OpenAiState {
            load: Load::new(&config),
            config,
            flavour,
            api_key,
            faults: Faults::default(),
            seen: Seen::default(),
        });
        let app = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(completions))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        // As the usual servers (uvicorn under vLLM and llama-cpp-python, Go): TCP_NODELAY on
        // every connection, so no reply waits for the client's delayed ACK.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "openai stand-in stopped");
            }
        });
        Ok(Self { addr, state, task })
    }

    /// Base URL without `/v1`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for OpenAiStandin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": null}})),
    )
        .into_response()
}

fn authorised(state: &OpenAiState, headers: &HeaderMap) -> bool {
    match &state.api_key {
        None => true,
        Some(key) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {key}")),
    }
}

async fn models(State(state): State<Arc<OpenAiState>>, headers: HeaderMap) -> Response {
    if !authorised(&state, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect API key provided",
        );
    }
    let data: Vec<Value> = state
        .config
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "standin"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn completions(
    State(state): State<Arc<OpenAiState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.seen.record(&body);
    if !authorised(&state, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect API key provided",
        );
    }
    let model = body["model"].as_str().unwrap_or("").to_string();
    if !state.config.models.contains(&model) {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!("The model `{model}` does not exist"),
        );
    }
    let rf = body.get("response_format").filter(|v| !v.is_null());
    let rf_type = rf.and_then(|r| r["type"].as_str()).unwrap_or("text");
    let schema = match (state.flavour, rf_type) {
        (_, "text") => None,
        (Flavour::PlainOnly, _) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", "response_format is not supported by this server")
        }
        (Flavour::LlamaCppPython, "json_schema") => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_server_error",
                "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  Input should be 'text' or 'json_object' [type=literal_error, input_value='json_schema']",
            )
        }
        (_, "json_schema") => rf.and_then(|r| r.pointer("/json_schema/schema")).cloned(),
        (_, "json_object") => rf.and_then(|r| r.get("schema")).cloned(),
        (_, other) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", &format!("unknown response_format type {other}"))
        }
    };
    if Faults::take(&state.faults.busy) {
        state
            .seen
            .rejected_busy
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "Server is busy",
        );
    }
    let Some(_admitted) = state.load.admit(&state.seen) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "Server is busy",
        );
    };
    let user = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let structured = rf_type != "text";
    let garbage = Faults::take(&state.faults.garbage);
    let malformed = Faults::take(&state.faults.malformed);
    let truncated = Faults::take(&state.faults.truncated);
    let text = state
        .load
        .process(&state.seen, state.config.latency, || {
            answer_for(&user, schema.as_ref(), structured, garbage)
        })
        .await;
    let usage = json!({
        "prompt_tokens": count_tokens(&user),
        "completion_tokens": count_tokens(&text),
        "total_tokens": count_tokens(&user) + count_tokens(&text),
    });
    if malformed {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            "{\"choices\": [oops",
        )
            .into_response();
    }
    if !body["stream"].as_bool().unwrap_or(false) {
        let full = json!({
            "id": "chatcmpl-standin", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        })
        .to_string();
        let out = if truncated {
            full[..full.len() / 2].to_string()
        } else {
            full
        };
        return ([(header::CONTENT_TYPE, "application/json")], out).into_response();
    }
    let event = |delta: Value, finish: Value| {
        let chunk = json!({
            "id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        format!("data: {chunk}\n\n")
    };
    let mut events = vec![event(json!({"role": "assistant"}), Value::Null)];
    events.extend(
        pieces(&text, 7)
            .iter()
            .map(|p| event(json!({"content": p}), Value::Null)),
    );
    if truncated {
        events.truncate(events.len() / 2);
    } else {
        events.push(event(json!({}), json!("stop")));
        events.push("data: [DONE]\n\n".to_string());
    }
    let body = Body::from_stream(futures::stream::iter(
        events.into_iter().map(Ok::<_, std::convert::Infallible>),
    ));
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}
