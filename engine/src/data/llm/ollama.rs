//! Ollama's native API: `/api/tags` to check the model, `/api/chat` (or `/api/generate`) with
//! `format` set to the answer's JSON schema, `options` (temperature, seed, num_ctx, num_predict)
//! and `keep_alive`; streaming (NDJSON) and non-streaming replies; `eval_count` and
//! `eval_duration` recorded. Ollama has no authentication, so this backend only talks to a
//! loopback address: the worker calls its local Ollama and nothing else ever reaches it.
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;

use super::{
    error_body, http_client, timed, BackendInfo, ChatReply, ChatRequest, LlmBackend, LlmError,
    RequestPolicy, ThroughputMeter, ThroughputStats,
};

/// Which Ollama endpoint generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OllamaEndpoint {
    /// `/api/chat` with system and user messages.
    Chat,
    /// `/api/generate` with `system` and `prompt`.
    Generate,
}

/// Settings of the Ollama backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OllamaConfig {
    /// Base URL; must be a loopback address (default `http://127.0.0.1:11434`).
    pub base_url: String,
    /// Model name as `ollama pull` knows it (`qwen2.5:3b`).
    pub model: String,
    /// Stream the reply (Ollama's default) or ask for one JSON object.
    pub stream: bool,
    /// Endpoint used to generate.
    pub endpoint: OllamaEndpoint,
    /// `keep_alive` sent with each request (`"5m"`, `"-1"`), if any.
    pub keep_alive: Option<String>,
    /// `options.num_ctx`, if set.
    pub num_ctx: Option<u32>,
    /// Concurrency, timeout and retries.
    pub policy: RequestPolicy,
}

impl OllamaConfig {
    /// Defaults for `model` on the local Ollama.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            base_url: "http://127.0.0.1:11434".into(),
            model: model.into(),
            stream: true,
            endpoint: OllamaEndpoint::Chat,
            keep_alive: Some("5m".into()),
            num_ctx: None,
            policy: RequestPolicy::default(),
        }
    }
}

/// The Ollama backend.
#[derive(Debug)]
pub struct OllamaBackend {
    config: OllamaConfig,
    base: String,
    client: reqwest::Client,
    permits: Semaphore,
    meter: ThroughputMeter,
}

#[derive(Debug, Deserialize)]
struct Tags {
    #[serde(default)]
    models: Vec<TagModel>,
}

#[derive(Debug, Deserialize)]
struct TagModel {
    name: String,
    #[serde(default)]
    model: Option<String>,
}

/// One object of a reply (the only one, or one line of a stream).
#[derive(Debug, Default, Deserialize)]
struct ReplyObject {
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    eval_count: Option<u64>,
    #[serde(default)]
    eval_duration: Option<u64>,
    #[serde(default)]
    prompt_eval_count: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Message {
    #[serde(default)]
    content: String,
}

impl ReplyObject {
    fn piece(&self) -> &str {
        self.message
            .as_ref()
            .map(|m| m.content.as_str())
            .or(self.response.as_deref())
            .unwrap_or("")
    }
}

/// Whether `url`'s host is a loopback address.
pub fn is_loopback_url(url: &reqwest::Url) -> bool {
    match url.host_str() {
        Some(h) => {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .map(|ip| ip.is_loopback())
                    .unwrap_or(false)
        }
        None => false,
    }
}

impl OllamaBackend {
    /// A backend; refuses a non-loopback or non-http URL.
    pub fn new(config: OllamaConfig) -> Result<Self, LlmError> {
        let url = reqwest::Url::parse(&config.base_url).map_err(|e| LlmError::BadEndpoint {
            endpoint: config.base_url.clone(),
            reason: format!("not a URL: {e}"),
        })?;
        if url.scheme() != "http" || !is_loopback_url(&url) {
            return Err(LlmError::BadEndpoint {
                endpoint: config.base_url.clone(),
                reason: "Ollama has no authentication, so ragd only calls it on this machine: use http://127.0.0.1:PORT (run the worker on the machine that runs Ollama)".into(),
            });
        }
        let base = config.base_url.trim_end_matches('/').to_string();
        // Loopback only (checked above), which every guard allows.
        let client = http_client(config.policy.timeout, &Default::default())?;
        Ok(Self {
            permits: Semaphore::new(config.policy.concurrency.max(1)),
            base,
            client,
            config,
            meter: ThroughputMeter::default(),
        })
    }

    fn missing(&self) -> LlmError {
        LlmError::ModelMissing {
            model: self.config.model.clone(),
            endpoint: self.base.clone(),
            hint: format!("run `ollama pull {}` first", self.config.model),
        }
    }

    fn body(&self, req: &ChatRequest) -> serde_json::Value {
        let mut options = json!({
            "temperature": req.temperature,
            "num_predict": req.max_tokens,
        });
        if let Some(seed) = req.seed {
            options["seed"] = json!(seed);
        }
        if let Some(n) = self.config.num_ctx {
            options["num_ctx"] = json!(n);
        }
        let mut body = json!({
            "model": self.config.model,
            "stream": self.config.stream,
            "options": options,
        });
        match self.config.endpoint {
            OllamaEndpoint::Chat => {
                let mut messages = Vec::new();
                if let Some(system) = &req.system {
                    messages.push(json!({"role": "system", "content": system}));
                }
                messages.push(json!({"role": "user", "content": req.user}));
                body["messages"] = json!(messages);
            }
            OllamaEndpoint::Generate => {
                body["prompt"] = json!(req.user);
                if let Some(system) = &req.system {
                    body["system"] = json!(system);
                }
            }
        }
        if let Some(schema) = &req.schema {
            body["format"] = schema.clone();
        }
        if let Some(k) = &self.config.keep_alive {
            body["keep_alive"] = json!(k);
        }
        body
    }

    async fn attempt(&self, req: &ChatRequest) -> Result<ChatReply, LlmError> {
        let path = match self.config.endpoint {
            OllamaEndpoint::Chat => "/api/chat",
            OllamaEndpoint::Generate => "/api/generate",
        };
        let url = format!("{}{path}", self.base);
        let timeout = self.config.policy.timeout;
        let (result, wall) = timed(async {
            let resp = self
                .client
                .post(&url)
                .json(&self.body(req))
                .send()
                .await
                .map_err(|e| LlmError::from_reqwest(&url, timeout, e))?;
            let status = resp.status().as_u16();
            if status == 404 {
                return Err(self.missing());
            }
            if status != 200 {
                return Err(LlmError::Http {
                    endpoint: url.clone(),
                    status,
                    body: error_body(resp).await,
                });
            }
            if self.config.stream {
                self.read_stream(&url, resp).await
            } else {
                let text = resp
                    .text()
                    .await
                    .map_err(|e| LlmError::from_reqwest(&url, timeout, e))?;
                let obj: ReplyObject =
                    serde_json::from_str(&text).map_err(|e| LlmError::Malformed {
                        endpoint: url.clone(),
                        message: format!("reply is not a JSON object: {e}"),
                    })?;
                finish(&url, obj, String::new())
            }
        })
        .await;
        result.map(|mut r| {
            r.wall_time = wall;
            r
        })
    }

    async fn read_stream(&self, url: &str, resp: reqwest::Response) -> Result<ChatReply, LlmError> {
        let timeout = self.config.policy.timeout;
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut text = String::new();
        while let Some(bytes) = stream.next().await {
            let bytes = bytes.map_err(|e| LlmError::from_reqwest(url, timeout, e))?;
            buf.extend_from_slice(&bytes);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                if line.trim().is_empty() {
                    continue;
                }
                let obj: ReplyObject =
                    serde_json::from_str(line.trim()).map_err(|e| LlmError::Malformed {
                        endpoint: url.to_string(),
                        message: format!("stream line is not JSON: {e}"),
                    })?;
                if obj.done || obj.error.is_some() {
                    return finish(url, obj, text);
                }
                text.push_str(obj.piece());
            }
        }
        // A last line without a newline.
        if let Ok(obj) = serde_json::from_slice::<ReplyObject>(&buf) {
            if obj.done {
                return finish(url, obj, text);
            }
        }
        Err(LlmError::Truncated {
            endpoint: url.to_string(),
            message: "stream ended without a final `done: true` object".into(),
        })
    }
}

fn finish(url: &str, obj: ReplyObject, mut text: String) -> Result<ChatReply, LlmError> {
    if let Some(error) = obj.error {
        return Err(LlmError::Malformed {
            endpoint: url.to_string(),
            message: format!("server reported an error: {error}"),
        });
    }
    if !obj.done {
        return Err(LlmError::Truncated {
            endpoint: url.to_string(),
            message: "reply has `done: false`".into(),
        });
    }
    text.push_str(obj.piece());
    Ok(ChatReply {
        text,
        prompt_tokens: obj.prompt_eval_count,
        completion_tokens: obj.eval_count,
        generation_time: obj.eval_duration.map(Duration::from_nanos),
        wall_time: Duration::ZERO,
        hit_token_limit: obj.done_reason.as_deref() == Some("length"),
    })
}

#[async_trait::async_trait]
impl LlmBackend for OllamaBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: "ollama".into(),
            model: self.config.model.clone(),
            endpoint: Some(self.base.clone()),
        }
    }

    async fn check(&self) -> Result<(), LlmError> {
        let url = format!("{}/api/tags", self.base);
        let timeout = self.config.policy.timeout;
        let tags: Tags = self
            .config
            .policy
            .retry
            .run("ollama tags", &self.meter, || async {
                let resp = self
                    .client
                    .get(&url)
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
                resp.json::<Tags>().await.map_err(|e| LlmError::Malformed {
                    endpoint: url.clone(),
                    message: e.to_string(),
                })
            })
            .await?;
        let want = &self.config.model;
        let found = tags.models.iter().any(|m| {
            [Some(&m.name), m.model.as_ref()]
                .into_iter()
                .flatten()
                .any(|n| n == want || *n == format!("{want}:latest"))
        });
        if found {
            Ok(())
        } else {
            Err(self.missing())
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
            .run("ollama chat", &self.meter, || self.attempt(request))
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

    #[test]
    fn refuses_non_loopback_endpoints() {
        let mut c = OllamaConfig::new("m");
        c.base_url = "http://10.0.0.5:11434".into();
        let err = OllamaBackend::new(c.clone()).unwrap_err();
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
        c.base_url = "http://localhost:11434".into();
        assert!(OllamaBackend::new(c.clone()).is_ok());
        c.base_url = "http://[::1]:11434/".into();
        assert!(OllamaBackend::new(c).is_ok());
    }

    #[test]
    fn request_body_carries_schema_options_and_keep_alive() {
        let mut c = OllamaConfig::new("qwen2.5:3b");
        c.num_ctx = Some(4096);
        let b = OllamaBackend::new(c).unwrap();
        let req = ChatRequest {
            system: Some("sys".into()),
            user: "hi".into(),
            schema: Some(json!({"type": "object"})),
            temperature: 0.5,
            seed: Some(9),
            max_tokens: 64,
        };
        let body = b.body(&req);
        assert_eq!(body["format"], json!({"type": "object"}));
        assert_eq!(body["options"]["seed"], 9);
        assert_eq!(body["options"]["num_ctx"], 4096);
        assert_eq!(body["options"]["num_predict"], 64);
        assert_eq!(body["keep_alive"], "5m");
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["content"], "hi");
    }
}
