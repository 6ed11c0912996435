//! A stand-in for the Hugging Face hub's file endpoint, bound to 127.0.0.1, speaking what
//! `huggingface_hub` and the hf-hub crate use:
//! `GET /{owner}/{repo}/resolve/{revision}/{file}` answers an LFS file with `302 Found` to a
//! content URL, carrying `X-Repo-Commit`, `X-Linked-Etag` (the content's SHA-256, quoted) and
//! `X-Linked-Size`; the content URL honours `Range: bytes=A-` / `bytes=A-B` with
//! `206 Partial Content` and `Content-Range`; an unknown repository or file gets 404 with
//! `X-Error-Code: RepoNotFound` / `EntryNotFound`. On demand it serves bytes that do not match
//! the announced hash (a corrupted transfer).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

/// Published files: `(repo, file)` -> content.
type Files = HashMap<(String, String), Arc<Vec<u8>>>;

/// What the stand-in serves and how.
#[derive(Debug, Default)]
pub struct HubState {
    /// `(repo, file)` -> content.
    files: Mutex<Files>,
    /// Serve flipped bytes under the true hash.
    pub corrupt: AtomicBool,
    /// Content requests served (downloads and size probes).
    pub content_requests: AtomicUsize,
}

/// A running stand-in; stops when dropped.
#[derive(Debug)]
pub struct HubStandin {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// Its state.
    pub state: Arc<HubState>,
    task: tokio::task::JoinHandle<()>,
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl HubStandin {
    /// Starts a stand-in on 127.0.0.1 at a free port.
    pub async fn start() -> std::io::Result<Self> {
        let state = Arc::new(HubState::default());
        let app = Router::new()
            .route("/{owner}/{repo}/resolve/{revision}/{*file}", get(resolve))
            .route("/cdn/{sha}", get(content))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "hub stand-in stopped");
            }
        });
        Ok(Self { addr, state, task })
    }

    /// Base URL, for `HF_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes a file.
    pub fn add_file(&self, repo: &str, file: &str, content: Vec<u8>) {
        self.state
            .files
            .lock()
            .unwrap()
            .insert((repo.into(), file.into()), Arc::new(content));
    }
}

impl Drop for HubStandin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn not_found(code: &str) -> Response {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .header("x-error-code", code)
        .body(Body::from(format!("{{\"error\":\"{code}\"}}")))
        .unwrap()
}

async fn resolve(
    State(state): State<Arc<HubState>>,
    Path((owner, repo, _revision, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = format!("{owner}/{repo}");
    let files = state.files.lock().unwrap();
    if !files.keys().any(|(r, _)| *r == repo) {
        return not_found("RepoNotFound");
    }
    let Some(content) = files.get(&(repo, file)) else {
        return not_found("EntryNotFound");
    };
    let sha = sha256_hex(content);
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, format!("http://{host}/cdn/{sha}"))
        .header("x-repo-commit", COMMIT)
        .header("x-linked-etag", format!("\"{sha}\""))
        .header("x-linked-size", content.len().to_string())
        .header(header::ETAG, format!("\"{}\"", &sha[..40]))
        .body(Body::empty())
        .unwrap()
}

async fn content(
    State(state): State<Arc<HubState>>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Response {
    state.content_requests.fetch_add(1, Ordering::SeqCst);
    let found = state
        .files
        .lock()
        .unwrap()
        .values()
        .find(|c| sha256_hex(c) == sha)
        .cloned();
    let Some(content) = found else {
        return not_found("EntryNotFound");
    };
    let mut bytes = content.as_ref().clone();
    if state.corrupt.load(Ordering::SeqCst) {
        let middle = bytes.len() / 2;
        for b in bytes.iter_mut().skip(middle).take(16) {
            *b ^= 0xFF;
        }
    }
    let total = bytes.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            let start: usize = a.parse().ok()?;
            let end: usize = if b.is_empty() {
                total.saturating_sub(1)
            } else {
                b.parse().ok()?
            };
            Some((start, end.min(total.saturating_sub(1))))
        });
    match range {
        Some((start, end)) if start < total && start <= end => Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{total}"),
            )
            .header(header::ETAG, format!("\"{sha}\""))
            .body(Body::from(bytes[start..=end].to_vec()))
            .unwrap(),
        Some(_) => Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{total}"))
            .body(Body::empty())
            .unwrap(),
        None => Response::builder()
            .status(StatusCode::OK)
            .header(header::ETAG, format!("\"{sha}\""))
            .body(Body::from(bytes))
            .unwrap(),
    }
}
