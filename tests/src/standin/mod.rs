//! Protocol-faithful stand-ins for LLM servers, bound to 127.0.0.1 only:
//! [`ollama`] speaks Ollama's native API, [`openai`] the OpenAI-compatible chat API.
//!
//! Both answer deterministically from the request (questions built from the passage's words, or a
//! judge's "yes"), report token counts, simulate load (a bounded number of requests run at once,
//! a bounded queue beyond which they answer 503), add a configurable latency, and inject faults
//! on demand: the next N answers can be garbage text, malformed protocol JSON, or truncated.
pub mod hf_hub;
pub mod ollama;
pub mod openai;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

/// Behaviour shared by both stand-ins.
#[derive(Debug, Clone)]
pub struct StandinConfig {
    /// Models served.
    pub models: Vec<String>,
    /// Delay before answering each request.
    pub latency: Duration,
    /// Requests processed at once (Ollama's OLLAMA_NUM_PARALLEL).
    pub max_parallel: usize,
    /// Requests allowed to wait beyond those (Ollama's OLLAMA_MAX_QUEUE); more get 503.
    pub max_queue: usize,
}

impl Default for StandinConfig {
    fn default() -> Self {
        Self {
            models: vec!["standin:latest".into()],
            latency: Duration::ZERO,
            max_parallel: 4,
            max_queue: 64,
        }
    }
}

/// Faults to inject into the next answers (each counter is decremented as used).
#[derive(Debug, Default)]
pub struct Faults {
    /// Next N answers carry text with no question in it.
    pub garbage: AtomicUsize,
    /// Next N replies are not valid protocol JSON.
    pub malformed: AtomicUsize,
    /// Next N replies stop half-way (no final object / `[DONE]`, or a cut body).
    pub truncated: AtomicUsize,
    /// Next N requests get 503 regardless of load.
    pub busy: AtomicUsize,
}

impl Faults {
    /// Takes one fault from a counter, if any is left.
    pub fn take(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// What a stand-in saw, for assertions.
#[derive(Debug, Default)]
pub struct Seen {
    /// Request bodies, in arrival order.
    pub requests: Mutex<Vec<Value>>,
    /// Most requests in flight at once.
    pub peak_in_flight: AtomicUsize,
    /// Requests answered 503.
    pub rejected_busy: AtomicUsize,
}

impl Seen {
    /// Copies the request bodies seen so far.
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn record(&self, body: &Value) {
        if let Ok(mut r) = self.requests.lock() {
            r.push(body.clone());
        }
    }
}

/// Tracks in-flight requests against parallel and queue limits.
#[derive(Debug)]
pub(crate) struct Load {
    in_flight: AtomicUsize,
    running: AtomicUsize,
    slots: tokio::sync::Semaphore,
    limit: usize,
}

impl Load {
    pub(crate) fn new(config: &StandinConfig) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            slots: tokio::sync::Semaphore::new(config.max_parallel.max(1)),
            limit: config.max_parallel.max(1) + config.max_queue,
        }
    }

    /// Admits a request, or `None` when the queue is full (the caller answers 503).
    pub(crate) fn admit(&self, seen: &Seen) -> Option<LoadGuard<'_>> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if now > self.limit {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            seen.rejected_busy.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        Some(LoadGuard { load: self })
    }

    /// Runs `work` in a processing slot, after `latency`, recording the peak of running requests.
    pub(crate) async fn process<T>(
        &self,
        seen: &Seen,
        latency: Duration,
        work: impl FnOnce() -> T,
    ) -> T {
        let _permit = self.slots.acquire().await;
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        seen.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(latency).await;
        let out = work();
        self.running.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

/// Releases an admitted request.
pub(crate) struct LoadGuard<'a> {
    load: &'a Load,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The passage and question count a generation request asks about, read from the user text and
/// the schema: questions are built from the passage's longer words.
pub fn answer_questions(user_text: &str, n: usize) -> Vec<String> {
    let passage = user_text.split("---").nth(1).unwrap_or(user_text);
    let mut words: Vec<String> = Vec::new();
    for w in passage.split(|c: char| !c.is_alphanumeric()) {
        if w.len() >= 5 && !words.iter().any(|x| x.eq_ignore_ascii_case(w)) {
            words.push(w.to_lowercase());
        }
    }
    if words.is_empty() {
        words.push("this topic".into());
    }
    (0..n.max(1))
        .map(|i| {
            let a = &words[i % words.len()];
            let b = &words[(i * 3 + 1) % words.len()];
            format!("How does {a} relate to {b} in practice?")
        })
        .collect()
}

/// The answer a stand-in gives: a judge verdict when the schema asks for `answer`, otherwise
/// questions, as JSON when `structured` and as a numbered list otherwise.
pub fn answer_for(
    user_text: &str,
    schema: Option<&Value>,
    structured: bool,
    garbage: bool,
) -> String {
    if garbage {
        return "I am sorry, but I cannot help with that request.".into();
    }
    let judge = schema
        .and_then(|s| s.pointer("/properties/answer"))
        .is_some();
    if judge {
        return if structured {
            r#"{"answer": "yes"}"#.into()
        } else {
            "yes".into()
        };
    }
    let n = schema
        .and_then(|s| s.pointer("/properties/questions/maxItems"))
        .and_then(Value::as_u64)
        .unwrap_or(2) as usize;
    let qs = answer_questions(user_text, n);
    if structured {
        serde_json::json!({ "questions": qs }).to_string()
    } else {
        let mut s = String::from("Here are some questions:\n");
        for (i, q) in qs.iter().enumerate() {
            s.push_str(&format!("{}. {q}\n", i + 1));
        }
        s
    }
}

/// Whitespace tokens of a text, the stand-ins' token count.
pub fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Splits a text into streaming pieces of about `size` characters.
pub fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}
