//! OpenAI-compatible `/v1/chat/completions` (llama.cpp's llama-server, LM Studio, vLLM,
//! llama-cpp-python's server) with structured output.
//!
//! Structured output is tried in order: `response_format` `{"type":"json_schema"}` (llama-server,
//! LM Studio, vLLM), then `{"type":"json_object","schema":...}` (what llama-cpp-python accepts),
//! then a plain prompt that spells the schema out. A server that refuses a mode (HTTP 400, 422,
//! 500 or 501 whose body talks about the response format or schema) moves the endpoint down the
//! chain, and the backend remembers where it landed for the rest of its life. `/v1/models` checks
//! the model; an API key, if any, is sent as a bearer token. Streaming (SSE) and non-streaming
//! replies are both handled.
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;

use super::{
    error_body, http_client, timed, BackendInfo, ChatReply, ChatRequest, LlmBackend, LlmError,
    RequestPolicy, ThroughputMeter, ThroughputStats,
};

/// How the answer's JSON schema is conveyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StructuredMode {
    /// `response_format: {"type": "json_schema", "json_schema": {...}}`.
    JsonSchema = 0,
    /// `response_format: {"type": "json_object", "schema": {...}}`.
    JsonObject = 1,
    /// No `response_format`; the schema is written into the prompt.
    Prompt = 2,
}

impl StructuredMode {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::JsonSchema,
            1 => Self::JsonObject,
            _ => Self::Prompt,
        }
    }
}

/// Settings of the OpenAI-compatible backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenAiConfig {
    /// Base URL, with or without the trailing `/v1` (`http://127.0.0.1:8080`).
    pub base_url: String,
    /// Model id; `None` takes the first one `/v1/models` lists.
    pub model: Option<String>,
    /// Bearer token, if the server wants one (read it from the environment, never a file). It
    /// is sent only over https or to this machine (see [`super::endpoint::may_carry_key`]).
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Where `api_key` came from (an environment variable's name), for messages.
    #[serde(skip)]
    pub api_key_source: String,
    /// The networks the endpoint may be in (config keys `allowed_networks`,
    /// `allow_public_peers`); the LAN by default.
    #[serde(default)]
    pub guard: ragd_shared::netguard::LanGuard,
    /// Stream the reply (SSE).
    pub stream: bool,
    /// First structured-output mode to try.
    pub start_mode: StructuredMode,
    /// Concurrency, timeout and retries.
    pub policy: RequestPolicy,
}

impl OpenAiConfig {
    /// Defaults for a server at `base_url`; the API key comes from `RAGD_LLM_API_KEY` or
    /// `OPENAI_API_KEY` when set.
    pub fn new(base_url: impl Into<String>) -> Self {
        let (api_key, api_key_source) = ["RAGD_LLM_API_KEY", "OPENAI_API_KEY"]
            .iter()
            .find_map(|v| {
                let key = std::env::var(v).ok().filter(|k| !k.is_empty())?;
                Some((Some(key), v.to_string()))
            })
            .unwrap_or_default();
        Self {
            base_url: base_url.into(),
            model: None,
            api_key,
            api_key_source,
            guard: Default::default(),
            stream: false,
            start_mode: StructuredMode::JsonSchema,
            policy: RequestPolicy::default(),
        }
    }
}

/// The OpenAI-compatible backend.
#[derive(Debug)]
pub struct OpenAiBackend {
    config: OpenAiConfig,
    base: String,
    model: std::sync::RwLock<String>,
    mode: AtomicU8,
    client: reqwest::Client,
    permits: Semaphore,
    meter: ThroughputMeter,
}

#[derive(Debug, Deserialize)]
struct Models {
    #[serde(default)]
    data: Vec<ModelEntry>,
}

#[derive(Debug, Deserialize)]
struct ModelEntry {
    id: String,
}

#[derive(Debug, Default, Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    timings: Option<Timings>,
}

#[derive(Debug, Default, Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<Msg>,
    #[serde(default)]
    delta: Option<Msg>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Msg {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// llama-server's own timing report.
#[derive(Debug, Default, Deserialize)]
struct Timings {
    #[serde(default)]
    predicted_ms: Option<f64>,
}

/// Whether an error body says the server refused the structured-output request.
fn refuses_format(status: u16, body: &str) -> bool {
    let b = body.to_ascii_lowercase();
    matches!(status, 400 | 422 | 500 | 501)
        && [
            "response_format",
            "json_schema",
            "json_object",
            "schema",
            "grammar",
        ]
        .iter()
        .any(|k| b.contains(k))
}

impl OpenAiBackend {
    /// A backend for `config.base_url` (http or https, inside the networks `config.guard`
    /// allows). The API key is dropped, with a warning, unless it may travel there.
    pub fn new(mut config: OpenAiConfig) -> Result<Self, LlmError> {
        let url = super::endpoint::check_url(&config.base_url, &config.guard)?;
        config.api_key =
            super::endpoint::key_for(&url, config.api_key.take(), &config.api_key_source);
        let trimmed = config.base_url.trim_end_matches('/');
        let base = if trimmed.ends_with("/v1") {
            trimmed.to_string()
        } else {
            format!("{trimmed}/v1")
        };
        Ok(Self {
            client: http_client(config.policy.timeout, &config.guard)?,
            permits: Semaphore::new(config.policy.concurrency.max(1)),
            model: std::sync::RwLock::new(config.model.clone().unwrap_or_default()),
            mode: AtomicU8::new(config.start_mode as u8),
            base,
            config,
            meter: ThroughputMeter::default(),
        })
    }

    /// The structured-output mode this endpoint has settled on so far.
    pub fn structured_mode(&self) -> StructuredMode {
        StructuredMode::from_u8(self.mode.load(Ordering::SeqCst))
    }

    fn model_name(&self) -> String {
        self.model.read().map(|m| m.clone()).unwrap_or_default()
    }

    fn authorize(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.api_key {
            Some(key) => rb.bearer_auth(key),
            None => rb,
        }
    }

    fn body(&self, req: &ChatRequest, mode: StructuredMode) -> serde_json::Value {
        let mut user = req.user.clone();
        if let (Some(schema), StructuredMode::Prompt) = (&req.schema, mode) {
            user.push_str(&format!(
                "\n\nReply with only a JSON value that follows this JSON schema, and nothing else:\n{schema}"
            ));
        }
        let mut messages = Vec::new();
        if let Some(system) = &req.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": user}));
        let mut body = json!({
            "model": self.model_name(),
            "messages": messages,
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
            "stream": self.config.stream,
        });
        if let Some(seed) = req.seed {
            body["seed"] = json!(seed);
        }
        if self.config.stream {
            // OpenAI, llama-server and vLLM send token counts in a last event only when asked.
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(schema) = &req.schema {
            match mode {
                StructuredMode::JsonSchema => {
                    body["response_format"] = json!({
                        "type": "json_schema",
                        "json_schema": {"name": "answer", "schema": schema, "strict": true},
                    });
                }
                StructuredMode::JsonObject => {
                    body["response_format"] = json!({"type": "json_object", "schema": schema});
                }
                StructuredMode::Prompt => {}
            }
        }
        body
    }

    /// One attempt; walks down the structured-output chain on refusals.
    async fn attempt(&self, req: &ChatRequest) -> Result<ChatReply, LlmError> {
        let url = format!("{}/chat/completions", self.base);
        let timeout = self.config.policy.timeout;
        loop {
            let mode = self.structured_mode();
            let (result, wall) = timed(async {
                let resp = self
                    .authorize(self.client.post(&url))
                    .json(&self.body(req, mode))
                    .send()
                    .await
                    .map_err(|e| LlmError::from_reqwest(&url, timeout, e))?;
                let status = resp.status().as_u16();
                if status != 200 {
                    let body = error_body(resp).await;
                    if status == 404 && body.to_ascii_lowercase().contains("model") {
                        return Err(LlmError::ModelMissing {
                            model: self.model_name(),
                            endpoint: self.base.clone(),
                            hint: "check the name against GET /v1/models, or load the model in the server".into(),
                        });
                    }
                    return Err(LlmError::Http {
                        endpoint: url.clone(),
                        status,
                        body,
                    });
                }
                if self.config.stream {
                    read_sse(&url, timeout, resp).await
                } else {
                    let text = resp
                        .text()
                        .await
                        .map_err(|e| LlmError::from_reqwest(&url, timeout, e))?;
                    let c: Completion =
                        serde_json::from_str(&text).map_err(|e| LlmError::Malformed {
                            endpoint: url.clone(),
                            message: format!("reply is not a chat completion: {e}"),
                        })?;
                    reply_from(&url, c, String::new(), false)
                }
            })
            .await;
            match result {
                Err(LlmError::Http { status, body, .. })
                    if req.schema.is_some()
                        && mode != StructuredMode::Prompt
                        && refuses_format(status, &body) =>
                {
                    let next = StructuredMode::from_u8(mode as u8 + 1);
                    // Only ever move down; a concurrent request may already have.
                    self.mode.fetch_max(next as u8, Ordering::SeqCst);
                    tracing::warn!(endpoint = %self.base, ?mode, ?next, status, "server refused the structured-output mode, falling back");
                }
                other => {
                    return other.map(|mut r| {
                        r.wall_time = wall;
                        r
                    })
                }
            }
        }
    }
}

fn reply_from(
    url: &str,
    c: Completion,
    streamed: String,
    from_stream: bool,
) -> Result<ChatReply, LlmError> {
    let (text, finish) = if from_stream {
        (
            streamed,
            c.choices.first().and_then(|ch| ch.finish_reason.clone()),
        )
    } else {
        let choice = c.choices.first().ok_or_else(|| LlmError::Malformed {
            endpoint: url.to_string(),
            message: "reply has no choices".into(),
        })?;
        let text = choice
            .message
            .as_ref()
            .and_then(|m| m.content.clone())
            .ok_or_else(|| LlmError::Malformed {
                endpoint: url.to_string(),
                message: "reply has no message content".into(),
            })?;
        (text, choice.finish_reason.clone())
    };
    Ok(ChatReply {
        text,
        prompt_tokens: c.usage.as_ref().and_then(|u| u.prompt_tokens),
        completion_tokens: c.usage.as_ref().and_then(|u| u.completion_tokens),
        generation_time: c
            .timings
            .and_then(|t| t.predicted_ms)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0)),
        wall_time: Duration::ZERO,
        hit_token_limit: finish.as_deref() == Some("length"),
    })
}

async fn read_sse(
    url: &str,
    timeout: Duration,
    resp: reqwest::Response,
) -> Result<ChatReply, LlmError> {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut text = String::new();
    let mut last = Completion::default();
    let mut finish_reason = None;
    // Servers that never report usage (llama-cpp-python) stream one token per content event.
    let mut content_events = 0u64;
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(|e| LlmError::from_reqwest(url, timeout, e))?;
        buf.extend_from_slice(&bytes);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                if let Some(r) = finish_reason {
                    last.choices = vec![Choice {
                        finish_reason: Some(r),
                        ..Default::default()
                    }];
                }
                let usage = last.usage.get_or_insert_with(Usage::default);
                usage.completion_tokens = usage.completion_tokens.or(Some(content_events));
                return reply_from(url, last, text, true);
            }
            let c: Completion = serde_json::from_str(data).map_err(|e| LlmError::Malformed {
                endpoint: url.to_string(),
                message: format!("stream event is not JSON: {e}"),
            })?;
            for ch in &c.choices {
                if let Some(piece) = ch.delta.as_ref().and_then(|d| d.content.as_deref()) {
                    content_events += u64::from(!piece.is_empty());
                    text.push_str(piece);
                }
                if ch.finish_reason.is_some() {
                    finish_reason = ch.finish_reason.clone();
                }
            }
            if c.usage.is_some() || c.timings.is_some() {
                last.usage = c.usage.or(last.usage);
                last.timings = c.timings.or(last.timings);
            }
        }
    }
    Err(LlmError::Truncated {
        endpoint: url.to_string(),
        message: "event stream ended without `data: [DONE]`".into(),
    })
}

#[async_trait::async_trait]
impl LlmBackend for OpenAiBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: "openai".into(),
            model: self.model_name(),
            endpoint: Some(self.base.clone()),
        }
    }

    async fn check(&self) -> Result<(), LlmError> {
        let url = format!("{}/models", self.base);
        let timeout = self.config.policy.timeout;
        let models: Models = self
            .config
            .policy
            .retry
            .run("openai models", &self.meter, || async {
                let resp = self
                    .authorize(self.client.get(&url))
                    .send()
                    .await
                    .map_err(|e| LlmError::from_reqwest(&url, timeout, e))?;
                let status = resp.status().as_u16();
                if status != 200 {
                    return Err(LlmError::Http {
                        endpoint: url.clone(),
                        status,
                        body: error_body(resp).await,
                    });
                }
                resp.json::<Models>()
                    .await
                    .map_err(|e| LlmError::Malformed {
                        endpoint: url.clone(),
                        message: e.to_string(),
                    })
            })
            .await?;
        let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
        match &self.config.model {
            Some(want) if ids.contains(&want.as_str()) => Ok(()),
            Some(want) => Err(LlmError::ModelMissing {
                model: want.clone(),
                endpoint: self.base.clone(),
                hint: format!(
                    "the server lists {ids:?}; pass one of those, or load the model in the server"
                ),
            }),
            None => {
                let first = ids.first().ok_or_else(|| LlmError::ModelMissing {
                    model: "(any)".into(),
                    endpoint: self.base.clone(),
                    hint: "the server lists no model; start it with a model loaded".into(),
                })?;
                if let Ok(mut m) = self.model.write() {
                    *m = first.to_string();
                }
                Ok(())
            }
        }
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatReply, LlmError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| LlmError::BadEndpoint {
                endpoint: self.base.clone(),
                reason: "backend closed".into(),
            })?;
        let reply = self
            .config
            .policy
            .retry
            .run("openai chat", &self.meter, || self.attempt(request))
            .await?;
        self.meter.record(&reply);
        Ok(reply)
    }

    fn stats(&self) -> ThroughputStats {
        self.meter.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ChatRequest {
        ChatRequest {
            system: None,
            user: "u".into(),
            schema: Some(json!({"type": "object"})),
            temperature: 0.0,
            seed: Some(1),
            max_tokens: 8,
        }
    }

    #[test]
    fn base_url_gets_v1_and_addresses_outside_the_lan_are_refused() {
        let b = OpenAiBackend::new(OpenAiConfig::new("http://127.0.0.1:9/")).unwrap();
        assert_eq!(b.base, "http://127.0.0.1:9/v1");
        let b = OpenAiBackend::new(OpenAiConfig::new("http://127.0.0.1:9/v1")).unwrap();
        assert_eq!(b.base, "http://127.0.0.1:9/v1");
        OpenAiBackend::new(OpenAiConfig::new("https://192.168.1.20:8443")).unwrap();
        let err = OpenAiBackend::new(OpenAiConfig::new("https://8.8.8.8")).unwrap_err();
        assert!(err.to_string().contains("allowed_networks"), "{err}");
        let mut allowed = OpenAiConfig::new("https://8.8.8.8");
        allowed.guard = ragd_shared::netguard::LanGuard::new(vec!["8.8.8.0/24".parse().unwrap()]);
        OpenAiBackend::new(allowed).unwrap();
    }

    #[test]
    fn the_api_key_is_sent_only_over_https_or_to_this_machine() {
        let with_key = |url: &str| {
            let mut c = OpenAiConfig::new(url);
            c.api_key = Some("sk-test".into());
            c.api_key_source = "TEST_KEY".into();
            OpenAiBackend::new(c).unwrap().config.api_key
        };
        assert_eq!(with_key("http://127.0.0.1:9").as_deref(), Some("sk-test"));
        assert_eq!(with_key("https://192.168.1.20").as_deref(), Some("sk-test"));
        assert_eq!(with_key("http://192.168.1.20:8080"), None);
    }

    #[test]
    fn each_mode_builds_its_request() {
        let b = OpenAiBackend::new(OpenAiConfig::new("http://127.0.0.1:9")).unwrap();
        let r = b.body(&req(), StructuredMode::JsonSchema);
        assert_eq!(r["response_format"]["type"], "json_schema");
        assert_eq!(
            r["response_format"]["json_schema"]["schema"]["type"],
            "object"
        );
        let r = b.body(&req(), StructuredMode::JsonObject);
        assert_eq!(r["response_format"]["type"], "json_object");
        assert_eq!(r["response_format"]["schema"]["type"], "object");
        let r = b.body(&req(), StructuredMode::Prompt);
        assert!(r.get("response_format").is_none());
        assert!(r["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("JSON schema"));
    }

    #[test]
    fn refusal_detection() {
        assert!(refuses_format(
            500,
            "Input should be 'text' or 'json_object'"
        ));
        assert!(refuses_format(400, "response_format not supported"));
        assert!(!refuses_format(500, "out of memory"));
        assert!(!refuses_format(503, "json_schema busy"));
    }
}
