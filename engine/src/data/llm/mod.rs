//! LLM backends behind one trait, plus what every backend shares: bounded concurrency, timeouts,
//! retries with exponential backoff on transient errors, and throughput measurement.
//!
//! - [`ollama`]: Ollama's native API (`/api/chat` or `/api/generate`), loopback only.
//! - [`openai`]: OpenAI-compatible `/v1/chat/completions` with a structured-output fallback chain.
//! - [`builtin`]: a GGUF instruct model run in-process with candle (SmolLM2 by default).
//! - [`ict`]: Inverse Cloze Task pseudo-queries, no LLM at all.
//! - [`generate`]: turns chunks into questions through any backend, with retries of malformed
//!   answers; [`prompt`] is what it asks for, [`parse`] its tolerant answer parser.
//! - [`mixed`]: an LLM within a budget (chunks or minutes), ICT for the rest.
pub mod builtin;
pub mod endpoint;
pub mod generate;
pub mod ict;
pub mod mixed;
pub mod ollama;
pub mod openai;
pub mod parse;
pub mod prompt;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Errors of LLM backends.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The server could not be reached.
    #[error("cannot reach {endpoint}: {message} (is the server running?)")]
    Connect {
        /// The URL called.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// The request took longer than the timeout.
    #[error("request to {endpoint} timed out after {timeout:?}")]
    Timeout {
        /// The URL called.
        endpoint: String,
        /// The timeout in force.
        timeout: Duration,
    },
    /// The server answered with an HTTP error status.
    #[error("{endpoint} answered HTTP {status}: {body}")]
    Http {
        /// The URL called.
        endpoint: String,
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The model is not served there.
    #[error("model {model} is not available at {endpoint}: {hint}")]
    ModelMissing {
        /// The model asked for.
        model: String,
        /// The server.
        endpoint: String,
        /// What to do about it.
        hint: String,
    },
    /// The reply was not in the protocol's format.
    #[error("malformed reply from {endpoint}: {message}")]
    Malformed {
        /// The URL called.
        endpoint: String,
        /// What was wrong.
        message: String,
    },
    /// The reply stopped before the protocol said it was complete.
    #[error("reply from {endpoint} ended early: {message}")]
    Truncated {
        /// The URL called.
        endpoint: String,
        /// What was missing.
        message: String,
    },
    /// The endpoint is not allowed or not usable.
    #[error("endpoint {endpoint} refused: {reason}")]
    BadEndpoint {
        /// The endpoint given.
        endpoint: String,
        /// Why it cannot be used, and what to do.
        reason: String,
    },
    /// Every attempt failed on transient errors.
    #[error("gave up after {attempts} attempts: {last}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        last: Box<LlmError>,
    },
    /// The in-process model failed.
    #[error("built-in model failed: {message}")]
    Builtin {
        /// What failed.
        message: String,
    },
}

impl LlmError {
    /// Whether retrying the same request may succeed (connection, timeout, 408/429/502/503/504,
    /// malformed or truncated replies).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Malformed { .. }
            | Self::Truncated { .. } => true,
            Self::Http { status, .. } => matches!(status, 408 | 429 | 502 | 503 | 504),
            _ => false,
        }
    }

    pub(crate) fn from_reqwest(endpoint: &str, timeout: Duration, e: reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout {
                endpoint: endpoint.to_string(),
                timeout,
            }
        } else if e.is_decode() || e.is_body() {
            Self::Truncated {
                endpoint: endpoint.to_string(),
                message: e.to_string(),
            }
        } else {
            Self::Connect {
                endpoint: endpoint.to_string(),
                message: e.to_string(),
            }
        }
    }
}

/// One chat request: a system and a user message, an optional JSON schema for the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// System message.
    pub system: Option<String>,
    /// User message.
    pub user: String,
    /// JSON schema the answer must follow, where the backend supports structured output.
    pub schema: Option<serde_json::Value>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: u32,
}

/// A backend's answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatReply {
    /// The answer text.
    pub text: String,
    /// Prompt tokens, when reported.
    pub prompt_tokens: Option<u64>,
    /// Generated tokens, when reported.
    pub completion_tokens: Option<u64>,
    /// Time spent generating, when reported (Ollama's `eval_duration`).
    pub generation_time: Option<Duration>,
    /// Wall time of the request, retries excluded.
    pub wall_time: Duration,
    /// Whether generation stopped at the token limit.
    pub hit_token_limit: bool,
}

/// Throughput counters of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ThroughputStats {
    /// Successful requests.
    pub requests: u64,
    /// Attempts that failed (retried or not).
    pub failed_attempts: u64,
    /// Generated tokens reported.
    pub completion_tokens: u64,
    /// Prompt tokens reported.
    pub prompt_tokens: u64,
    /// Seconds of generation (reported by the server, else wall time per request).
    pub generation_seconds: f64,
    /// Generated tokens per second of generation time (per request stream).
    pub tokens_per_second: f64,
}

/// Thread-safe throughput counters.
#[derive(Debug, Default)]
pub struct ThroughputMeter {
    requests: AtomicU64,
    failed: AtomicU64,
    completion_tokens: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_nanos: AtomicU64,
}

impl ThroughputMeter {
    /// Records a successful reply.
    pub fn record(&self, reply: &ChatReply) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(reply.completion_tokens.unwrap_or(0), Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(reply.prompt_tokens.unwrap_or(0), Ordering::Relaxed);
        let t = reply.generation_time.unwrap_or(reply.wall_time);
        self.generation_nanos
            .fetch_add(t.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Records a failed attempt.
    pub fn record_failure(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> ThroughputStats {
        let tokens = self.completion_tokens.load(Ordering::Relaxed);
        let secs = self.generation_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        ThroughputStats {
            requests: self.requests.load(Ordering::Relaxed),
            failed_attempts: self.failed.load(Ordering::Relaxed),
            completion_tokens: tokens,
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            generation_seconds: secs,
            tokens_per_second: if secs > 0.0 {
                tokens as f64 / secs
            } else {
                0.0
            },
        }
    }
}

/// Retry schedule for transient errors: `initial_backoff` doubling up to `max_backoff`, with up
/// to 25% random jitter, at most `max_attempts` attempts in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub max_attempts: u32,
    /// First wait.
    pub initial_backoff: Duration,
    /// Longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` (attempt counts from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let base = exp.min(self.max_backoff);
        let jitter = base.mul_f64(rand::random::<f64>() * 0.25);
        base + jitter
    }

    /// Runs `op` until it succeeds, fails with a non-transient error, or attempts run out.
    pub async fn run<T, F, Fut>(
        &self,
        what: &str,
        meter: &ThroughputMeter,
        mut op: F,
    ) -> Result<T, LlmError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, LlmError>>,
    {
        let attempts = self.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    meter.record_failure();
                    if !e.is_transient() {
                        return Err(e);
                    }
                    if attempt >= attempts {
                        return Err(LlmError::RetriesExhausted {
                            attempts: attempt,
                            last: Box::new(e),
                        });
                    }
                    let wait = self.backoff(attempt);
                    tracing::warn!(what, attempt, ?wait, error = %e, "transient LLM error, backing off");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Settings every HTTP backend shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestPolicy {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Timeout of one request, body included.
    pub timeout: Duration,
    /// Retries on transient errors.
    pub retry: RetryPolicy,
}

impl Default for RequestPolicy {
    fn default() -> Self {
        Self {
            concurrency: 4,
            timeout: Duration::from_secs(120),
            retry: RetryPolicy::default(),
        }
    }
}

/// What a backend is, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `ollama`, `openai`, `builtin` or `ict`.
    pub kind: String,
    /// The model name or file.
    pub model: String,
    /// The endpoint, for HTTP backends.
    pub endpoint: Option<String>,
}

/// An LLM that answers chat requests.
#[async_trait::async_trait]
pub trait LlmBackend: Send + Sync {
    /// What this backend is.
    fn info(&self) -> BackendInfo;
    /// Checks that the server is up and serves the model; the error says how to fix it.
    async fn check(&self) -> Result<(), LlmError>;
    /// Answers one request, retrying transient errors; concurrency is bounded inside.
    async fn chat(&self, request: &ChatRequest) -> Result<ChatReply, LlmError>;
    /// Throughput so far.
    fn stats(&self) -> ThroughputStats;
    /// Requests it can really serve at once, where it has a fixed limit (an in-process model
    /// answers one at a time); `None` where its own request policy bounds concurrency.
    fn parallelism(&self) -> Option<usize> {
        None
    }
}

/// Builds the HTTP client HTTP backends use (no proxy, so loopback traffic stays local).
pub(crate) fn http_client(
    timeout: Duration,
    guard: &ragd_shared::netguard::LanGuard,
) -> Result<reqwest::Client, LlmError> {
    reqwest::Client::builder()
        .dns_resolver(endpoint::GuardedResolver::new(guard.clone()))
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .no_proxy()
        .build()
        .map_err(|e| LlmError::BadEndpoint {
            endpoint: String::new(),
            reason: format!("cannot build an HTTP client: {e}"),
        })
}

/// Reads an error body (first 500 characters) for an error message.
pub(crate) async fn error_body(resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    text.chars().take(500).collect()
}

/// Times a future.
pub(crate) async fn timed<T>(fut: impl Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let v = fut.await;
    (v, start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn transient_classification() {
        let http = |status| LlmError::Http {
            endpoint: "e".into(),
            status,
            body: String::new(),
        };
        assert!(http(503).is_transient());
        assert!(http(429).is_transient());
        assert!(!http(404).is_transient());
        assert!(!http(500).is_transient());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        let b1 = p.backoff(1);
        let b3 = p.backoff(3);
        assert!(b1 >= Duration::from_millis(100) && b1 <= Duration::from_millis(125));
        assert!(b3 >= Duration::from_millis(400) && b3 <= Duration::from_millis(500));
        assert!(p.backoff(30) <= Duration::from_millis(1250));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_on_success_and_on_permanent_errors() {
        let meter = ThroughputMeter::default();
        let p = RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        };
        let calls = AtomicU32::new(0);
        let v = p
            .run("t", &meter, || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(LlmError::Http {
                        endpoint: "e".into(),
                        status: 503,
                        body: String::new(),
                    })
                } else {
                    Ok(7)
                }
            })
            .await
            .unwrap();
        assert_eq!((v, calls.load(Ordering::SeqCst)), (7, 3));
        let calls = AtomicU32::new(0);
        let err = p
            .run("t", &meter, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(LlmError::Http {
                    endpoint: "e".into(),
                    status: 404,
                    body: String::new(),
                })
            })
            .await
            .unwrap_err();
        assert!(matches!(err, LlmError::Http { status: 404, .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let err = p
            .run("t", &meter, || async {
                Err::<(), _>(LlmError::Truncated {
                    endpoint: "e".into(),
                    message: "eof".into(),
                })
            })
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            LlmError::RetriesExhausted { attempts: 4, .. }
        ));
        assert_eq!(meter.snapshot().failed_attempts, 7);
    }
}
