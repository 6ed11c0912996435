//! An Ollama stand-in: `/api/tags`, `/api/chat` and `/api/generate`, streaming NDJSON (the
//! default) or one JSON object, `format` as a JSON schema (or `"json"`), `eval_count` and
//! `eval_duration` in the final object, 404 for an unknown model, 503 when the queue is full.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{answer_for, count_tokens, pieces, Faults, Load, Seen, StandinConfig};

/// Shared state of a running stand-in.
#[derive(Debug)]
pub struct OllamaState {
    /// Its configuration.
    pub config: StandinConfig,
    /// Faults to inject.
    pub faults: Faults,
    /// What it saw.
    pub seen: Seen,
    load: Load,
}

/// A running stand-in; stops when dropped.
#[derive(Debug)]
pub struct OllamaStandin {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// Its state.
    pub state: Arc<OllamaState>,
    task: tokio::task::JoinHandle<()>,
}

impl OllamaStandin {
    /// Starts a stand-in on 127.0.0.1 at a free port.
    pub async fn start(config: StandinConfig) -> std::io::Result<Self> {
        let state = Arc::new(OllamaState {
            load: Load::new(&config),
            config,
            faults: Faults::default(),
            seen: Seen::default(),
        });
        let app = Router::new()
            .route("/api/tags", get(tags))
            .route("/api/chat", post(chat))
            .route("/api/generate", post(generate))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        // As Ollama's Go server: Go sets TCP_NODELAY on every connection. Without it a reply's
        // later writes wait for the client's delayed ACK (40 ms on Linux) now and then.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "ollama stand-in stopped");
            }
        });
        Ok(Self { addr, state, task })
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for OllamaStandin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("1970-01-01T00:00:00Z+{secs}s")
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn tags(State(state): State<Arc<OllamaState>>) -> Response {
    let models: Vec<Value> = state
        .config
        .models
        .iter()
        .map(|m| {
            json!({
                "name": m, "model": m, "modified_at": now(), "size": 1234,
                "digest": "0".repeat(64),
                "details": {"format": "gguf", "family": "llama", "parameter_size": "135M", "quantization_level": "Q4_1"},
            })
        })
        .collect();
    Json(json!({ "models": models })).into_response()
}

fn serves(state: &OllamaState, model: &str) -> bool {
    state
        .config
        .models
        .iter()
        .any(|m| m == model || *m == format!("{model}:latest"))
}

async fn chat(state: State<Arc<OllamaState>>, Json(body): Json<Value>) -> Response {
    let user = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    respond(state, body, user, true).await
}

async fn generate(state: State<Arc<OllamaState>>, Json(body): Json<Value>) -> Response {
    let prompt = body["prompt"].as_str().unwrap_or("").to_string();
    respond(state, body, prompt, false).await
}

async fn respond(
    State(state): State<Arc<OllamaState>>,
    body: Value,
    user: String,
    is_chat: bool,
) -> Response {
    state.seen.record(&body);
    let model = body["model"].as_str().unwrap_or("").to_string();
    if !serves(&state, &model) {
        return error(
            StatusCode::NOT_FOUND,
            &format!("model \"{model}\" not found, try pulling it first"),
        );
    }
    if Faults::take(&state.faults.busy) {
        state
            .seen
            .rejected_busy
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server busy, please try again.  maximum pending requests exceeded",
        );
    }
    let Some(_admitted) = state.load.admit(&state.seen) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server busy, please try again.  maximum pending requests exceeded",
        );
    };
    let stream = body["stream"].as_bool().unwrap_or(true);
    let format = body.get("format").filter(|f| !f.is_null());
    let schema = format.filter(|f| f.is_object());
    let latency = state.config.latency;
    let garbage = Faults::take(&state.faults.garbage);
    let malformed = Faults::take(&state.faults.malformed);
    let truncated = Faults::take(&state.faults.truncated);
    let text = state
        .load
        .process(&state.seen, latency, || {
            answer_for(&user, schema, format.is_some(), garbage)
        })
        .await;
    let eval_count = count_tokens(&text);
    let eval_ns = latency.as_nanos().max(1_000_000) as u64;
    let piece = |content: &str, done: bool| {
        let mut obj = json!({"model": model, "created_at": now(), "done": done});
        if is_chat {
            obj["message"] = json!({"role": "assistant", "content": content});
        } else {
            obj["response"] = json!(content);
        }
        obj
    };
    let mut last = piece(if stream { "" } else { &text }, true);
    last["done_reason"] = json!("stop");
    for (k, v) in [
        ("total_duration", eval_ns + 2_000_000),
        ("load_duration", 1_000_000),
        ("prompt_eval_count", count_tokens(&user)),
        ("prompt_eval_duration", 1_000_000),
        ("eval_count", eval_count),
        ("eval_duration", eval_ns),
    ] {
        last[k] = json!(v);
    }
    if malformed {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            "{\"model\": oops not json",
        )
            .into_response();
    }
    if !stream {
        let full = last.to_string();
        let out = if truncated {
            full[..full.len() / 2].to_string()
        } else {
            full
        };
        return ([(header::CONTENT_TYPE, "application/json")], out).into_response();
    }
    let mut lines: Vec<String> = pieces(&text, 7)
        .iter()
        .map(|p| piece(p, false).to_string() + "\n")
        .collect();
    if truncated {
        lines.truncate(lines.len() / 2);
    } else {
        lines.push(last.to_string() + "\n");
    }
    let body = Body::from_stream(futures::stream::iter(
        lines.into_iter().map(Ok::<_, std::convert::Infallible>),
    ));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}
