//! Probing of local LLM endpoints: Ollama (`GET /api/tags`) and OpenAI-compatible servers
//! (`GET /v1/models`). All endpoints are probed concurrently, each bounded by the probe timeout.

use std::time::Duration;

use futures::future::join_all;
use ragd_engine::data::llm::endpoint;
use ragd_shared::netguard::LanGuard;
use reqwest::Url;

use super::model_list::parse_models;
use serde::{Deserialize, Serialize, Serializer};

use super::{CapabilityError, LlmApi, LlmEndpoint};

/// Where Ollama listens by default.
pub const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11434";

/// The name under which the Ollama endpoint is reported.
const OLLAMA_NAME: &str = "ollama";

/// Largest model-list answer read; anything larger is treated as malformed.
const MAX_BODY_BYTES: usize = 4 << 20;

/// Which LLM endpoints to look for: the `[llm]` section of the worker config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmProbeConfig {
    /// Ollama base URL; `None` or "off" disables the probe. Default [`DEFAULT_OLLAMA_URL`].
    #[serde(serialize_with = "serialize_ollama_url")]
    pub ollama_url: Option<String>,
    /// OpenAI-compatible servers (llama.cpp server, vLLM, LM Studio, ...) to probe.
    pub openai_endpoints: Vec<OpenAiEndpointConfig>,
    /// Limit on each probe, connection included (default 2 s), e.g. "500ms".
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The networks endpoints may be in: the worker's `allowed_networks` /
    /// `allow_public_peers` (set when the config is loaded, not a key of this section).
    #[serde(skip)]
    pub guard: LanGuard,
}

impl Default for LlmProbeConfig {
    fn default() -> Self {
        Self {
            ollama_url: Some(DEFAULT_OLLAMA_URL.to_string()),
            openai_endpoints: Vec::new(),
            timeout: Duration::from_secs(2),
            guard: LanGuard::default(),
        }
    }
}

impl LlmProbeConfig {
    /// A configuration that probes nothing.
    pub fn disabled() -> Self {
        Self {
            ollama_url: None,
            ..Self::default()
        }
    }

    /// The Ollama URL to probe, unless disabled (`None`, "off" or empty).
    pub fn ollama(&self) -> Option<&str> {
        self.ollama_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty() && !u.eq_ignore_ascii_case("off"))
    }
}

/// Written as "off" when disabled, so a saved config reads back the same.
fn serialize_ollama_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(url.as_deref().unwrap_or("off"))
}

/// One OpenAI-compatible endpoint to probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiEndpointConfig {
    /// Name reported to the cluster, unique among endpoints (e.g. "llama-cpp").
    pub name: String,
    /// Base URL, e.g. "http://127.0.0.1:8080" (a trailing "/v1" is accepted too).
    pub url: String,
    /// Environment variable holding the API key sent as `Authorization: Bearer`, if any.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

/// One endpoint ready to probe.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    api: LlmApi,
    /// Base URL as configured.
    url: String,
    /// Where the model list is.
    models_url: Url,
    /// Environment variable holding the API key, if configured.
    api_key_env: Option<String>,
}

/// Why an endpoint is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProbeFailure {
    /// Nothing answered in time: normal when the server is not running (debug log).
    Unreachable(String),
    /// Something answered, but not a model list (warning).
    Malformed(String),
}

/// Probes every configured endpoint concurrently and returns those that answered with a model list.
///
/// Unreachable endpoints are left out with a debug event, malformed answers with a warning naming
/// the endpoint. Errors only for invalid configuration (bad URL, duplicate name, zero timeout).
pub async fn probe_llm_endpoints(
    cfg: &LlmProbeConfig,
) -> Result<Vec<LlmEndpoint>, CapabilityError> {
    let targets = targets(cfg)?;
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let client = reqwest::Client::builder()
        .dns_resolver(endpoint::GuardedResolver::new(cfg.guard.clone()))
        .no_proxy() // Endpoints are local; a system proxy would only get in the way.
        .connect_timeout(cfg.timeout)
        .timeout(cfg.timeout)
        .build()
        .map_err(|source| CapabilityError::HttpClient { source })?;
    let probes = targets.iter().map(|target| {
        let client = &client;
        async move {
            let outcome = match tokio::time::timeout(cfg.timeout, probe(client, target)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(ProbeFailure::Unreachable(format!(
                    "no answer within {:?}",
                    cfg.timeout
                ))),
            };
            report(target, outcome)
        }
    });
    Ok(join_all(probes).await.into_iter().flatten().collect())
}

/// Logs a failed probe at the level it deserves and keeps only successes.
fn report(target: &Target, outcome: Result<LlmEndpoint, ProbeFailure>) -> Option<LlmEndpoint> {
    match outcome {
        Ok(endpoint) => {
            tracing::debug!(endpoint = %target.name, url = %target.url, models = endpoint.models.len(), "LLM endpoint found");
            Some(endpoint)
        }
        Err(ProbeFailure::Unreachable(reason)) => {
            tracing::debug!(endpoint = %target.name, url = %target.url, %reason, "LLM endpoint not reachable");
            None
        }
        Err(ProbeFailure::Malformed(reason)) => {
            tracing::warn!(
                endpoint = %target.name,
                url = %target.url,
                %reason,
                "LLM endpoint answered but not with a model list; leaving it out (check its URL and API kind)"
            );
            None
        }
    }
}

/// Validates the configuration into probe targets.
fn targets(cfg: &LlmProbeConfig) -> Result<Vec<Target>, CapabilityError> {
    if cfg.timeout.is_zero() {
        return Err(CapabilityError::InvalidSetting {
            key: "timeout",
            value: "0s".into(),
            reason: "probes need time to answer; use e.g. \"2s\"".into(),
        });
    }
    let mut targets = Vec::new();
    if let Some(url) = cfg.ollama() {
        let models_url = endpoint_url(OLLAMA_NAME, url, "/api/tags", &cfg.guard)?;
        targets.push(Target {
            name: OLLAMA_NAME.into(),
            api: LlmApi::Ollama,
            url: url.to_string(),
            models_url,
            api_key_env: None,
        });
    }
    for ep in &cfg.openai_endpoints {
        let name = ep.name.trim();
        if name.is_empty() {
            return Err(CapabilityError::InvalidEndpointUrl {
                endpoint: ep.name.clone(),
                url: ep.url.clone(),
                reason: "the endpoint has no name; give it a short unique `name`".into(),
            });
        }
        if targets.iter().any(|t| t.name == name) {
            return Err(CapabilityError::InvalidEndpointUrl {
                endpoint: name.to_string(),
                url: ep.url.clone(),
                reason: format!("the name `{name}` is used twice (\"ollama\" is taken when Ollama probing is on); rename one"),
            });
        }
        let base = ep.url.trim().trim_end_matches('/');
        let path = if base.ends_with("/v1") {
            "/models"
        } else {
            "/v1/models"
        };
        let models_url = endpoint_url(name, base, path, &cfg.guard)?;
        targets.push(Target {
            name: name.to_string(),
            api: LlmApi::OpenAiCompatible,
            url: ep.url.clone(),
            models_url,
            api_key_env: ep.api_key_env.clone().filter(|v| !v.trim().is_empty()),
        });
    }
    Ok(targets)
}

/// `base` + `path` as a URL: http or https, inside the networks `guard` allows.
fn endpoint_url(
    name: &str,
    base: &str,
    path: &str,
    guard: &LanGuard,
) -> Result<Url, CapabilityError> {
    let full = format!("{}{path}", base.trim().trim_end_matches('/'));
    endpoint::check_url(&full, guard).map_err(|e| CapabilityError::InvalidEndpointUrl {
        endpoint: name.to_string(),
        url: base.to_string(),
        reason: match e {
            ragd_engine::data::llm::LlmError::BadEndpoint { reason, .. } => reason,
            other => other.to_string(),
        },
    })
}

/// The API key of an endpoint (from its `api_key_env` variable), if set and allowed to travel
/// to `url` (over https, or to this machine).
pub fn endpoint_key(api_key_env: Option<&str>, url: &Url) -> Option<String> {
    let var = api_key_env?;
    match std::env::var(var) {
        Ok(key) if !key.is_empty() => endpoint::key_for(url, Some(key), var),
        _ => {
            tracing::warn!(
                url = %url,
                variable = %var,
                "api_key_env names an unset or empty environment variable; calling without an API key"
            );
            None
        }
    }
}

/// Fetches and parses one endpoint's model list.
async fn probe(client: &reqwest::Client, target: &Target) -> Result<LlmEndpoint, ProbeFailure> {
    let mut request = client.get(target.models_url.clone());
    if let Some(key) = endpoint_key(target.api_key_env.as_deref(), &target.models_url) {
        request = request.bearer_auth(key);
    }
    let mut response = request.send().await.map_err(classify)?;
    let status = response.status();
    if !status.is_success() {
        let hint = if matches!(status.as_u16(), 401 | 403) {
            "; set `api_key_env` to the environment variable holding its API key"
        } else {
            ""
        };
        return Err(ProbeFailure::Malformed(format!(
            "GET {} answered HTTP {status}{hint}",
            target.models_url.path()
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ProbeFailure::Malformed(format!(
                "model list larger than {MAX_BODY_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let models = parse_models(target.api, &body).map_err(ProbeFailure::Malformed)?;
    Ok(LlmEndpoint {
        name: target.name.clone(),
        api: target.api,
        url: target.url.clone(),
        models,
    })
}

/// Connection failures and time-outs mean "not running"; anything else means something answered.
fn classify(error: reqwest::Error) -> ProbeFailure {
    let text = error_chain(&error);
    if error.is_connect() || error.is_timeout() {
        ProbeFailure::Unreachable(text)
    } else {
        ProbeFailure::Malformed(text)
    }
}

/// An error and its sources on one line (reqwest's own message hides the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::capabilities::test_http::{
        closed_port_url, Behaviour, Logs, TestServer, OLLAMA_TAGS, OPENAI_MODELS,
    };
    use crate::capabilities::{detect, CapabilityOverrides};

    fn openai(name: &str, url: String, api_key_env: Option<&str>) -> OpenAiEndpointConfig {
        OpenAiEndpointConfig {
            name: name.into(),
            url,
            api_key_env: api_key_env.map(str::to_string),
        }
    }

    #[tokio::test]
    async fn probes_real_garbage_and_closed_endpoints() {
        let ollama = TestServer::start(Behaviour::Real).await;
        let openai_srv = TestServer::start(Behaviour::Real).await;
        let garbage = TestServer::start(Behaviour::GarbageJson).await;
        let not_http = TestServer::start(Behaviour::NotHttp).await;
        let closed = closed_port_url().await;
        // Set once, read by this test only.
        std::env::set_var("RAGD_TEST_CAPS_LLM_KEY", "sk-test-123");
        let cfg = LlmProbeConfig {
            ollama_url: Some(ollama.url()),
            openai_endpoints: vec![
                openai(
                    "llama-cpp",
                    format!("{}/v1/", openai_srv.url()),
                    Some("RAGD_TEST_CAPS_LLM_KEY"),
                ),
                openai("garbage", garbage.url(), None),
                openai("not-http", not_http.url(), None),
                openai("closed", closed.clone(), None),
            ],
            timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let logs = Logs::default();
        let guard = logs.capture();
        let found = probe_llm_endpoints(&cfg).await.unwrap();
        drop(guard);

        assert_eq!(
            found,
            vec![
                LlmEndpoint {
                    name: "ollama".into(),
                    api: LlmApi::Ollama,
                    url: ollama.url(),
                    models: vec!["gemma3:latest".into(), "llama3.2:1b".into()],
                },
                LlmEndpoint {
                    name: "llama-cpp".into(),
                    api: LlmApi::OpenAiCompatible,
                    url: format!("{}/v1/", openai_srv.url()),
                    models: vec!["qwen2.5-7b-instruct".into(), "phi-4".into()],
                },
            ]
        );
        let warnings = logs.lines("WARN");
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(
            warnings.iter().any(|l| l.contains("endpoint=garbage")),
            "{warnings:#?}"
        );
        assert!(
            warnings.iter().any(|l| l.contains("endpoint=not-http")),
            "{warnings:#?}"
        );
        assert!(warnings.iter().all(|l| !l.contains("sk-test-123")));
        let debug = logs.lines("DEBUG");
        assert!(
            debug
                .iter()
                .any(|l| l.contains("endpoint=closed") && l.contains("not reachable")),
            "{debug:#?}"
        );

        assert_eq!(
            ollama.stop().await,
            vec!["GET /api/tags HTTP/1.1 | ".to_string()]
        );
        let seen = openai_srv.stop().await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with("GET /v1/models HTTP/1.1 | "),
            "{seen:?}"
        );
        assert!(
            seen[0]
                .to_ascii_lowercase()
                .ends_with("authorization: bearer sk-test-123"),
            "{seen:?}"
        );
        assert_eq!(garbage.stop().await.len(), 1);
        assert_eq!(not_http.stop().await.len(), 1);
    }

    #[tokio::test]
    async fn wrong_api_kind_is_a_warning() {
        // An OpenAI-compatible server configured as Ollama answers 404 on /api/tags.
        let server = TestServer::start(Behaviour::Real).await;
        let mut cfg = LlmProbeConfig::disabled();
        cfg.openai_endpoints = vec![openai("fine", server.url(), None)];
        cfg.ollama_url = Some(format!("{}/not-ollama", server.url()));
        let logs = Logs::default();
        let guard = logs.capture();
        let found = probe_llm_endpoints(&cfg).await.unwrap();
        drop(guard);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "fine");
        let warnings = logs.lines("WARN");
        assert!(
            warnings
                .iter()
                .any(|l| l.contains("endpoint=ollama") && l.contains("404")),
            "{warnings:#?}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn detect_finishes_within_the_timeout_when_an_endpoint_hangs() {
        let silent = TestServer::start(Behaviour::Silent).await;
        let real = TestServer::start(Behaviour::Real).await;
        let cfg = LlmProbeConfig {
            ollama_url: Some(real.url()),
            openai_endpoints: vec![openai("silent", silent.url(), None)],
            timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let started = Instant::now();
        let caps = tokio::time::timeout(
            Duration::from_secs(30),
            detect(&CapabilityOverrides::default(), &cfg),
        )
        .await
        .expect("detect hung past its probe timeout")
        .unwrap();
        // Generous bound: the probe timeout plus system detection on a loaded machine.
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(caps.llm_endpoints.len(), 1);
        assert_eq!(caps.llm_endpoints[0].name, "ollama");
        assert!(caps.has_llm());
        assert_eq!(
            silent.stop().await.len(),
            1,
            "the silent endpoint was asked"
        );
        real.stop().await;
    }

    #[test]
    fn parses_model_lists_per_api() {
        assert_eq!(
            parse_models(LlmApi::Ollama, OLLAMA_TAGS.as_bytes()).unwrap(),
            vec!["gemma3:latest", "llama3.2:1b"]
        );
        assert_eq!(
            parse_models(LlmApi::Ollama, br#"{"models":[]}"#).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            parse_models(LlmApi::Ollama, br#"{"models":null}"#).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            parse_models(LlmApi::OpenAiCompatible, OPENAI_MODELS.as_bytes()).unwrap(),
            vec!["qwen2.5-7b-instruct", "phi-4"]
        );
        assert!(parse_models(LlmApi::Ollama, OPENAI_MODELS.as_bytes()).is_err());
        assert!(parse_models(LlmApi::OpenAiCompatible, OLLAMA_TAGS.as_bytes()).is_err());
        assert!(parse_models(LlmApi::OpenAiCompatible, b"garbage").is_err());
    }

    #[test]
    fn validates_configuration() {
        let off = LlmProbeConfig {
            ollama_url: Some("off".into()),
            ..Default::default()
        };
        assert!(targets(&off).unwrap().is_empty());
        assert!(targets(&LlmProbeConfig::disabled()).unwrap().is_empty());

        let t = targets(&LlmProbeConfig::default()).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].models_url.as_str(), "http://127.0.0.1:11434/api/tags");

        let mut cfg = LlmProbeConfig::disabled();
        cfg.openai_endpoints = vec![
            openai("a", "http://127.0.0.1:8080".into(), None),
            openai("b", "http://localhost:8000/v1".into(), None),
        ];
        let t = targets(&cfg).unwrap();
        assert_eq!(t[0].models_url.as_str(), "http://127.0.0.1:8080/v1/models");
        assert_eq!(t[1].models_url.as_str(), "http://localhost:8000/v1/models");

        let bad = |eps: Vec<OpenAiEndpointConfig>| {
            let cfg = LlmProbeConfig {
                openai_endpoints: eps,
                ..Default::default()
            };
            targets(&cfg).unwrap_err().to_string()
        };
        assert!(bad(vec![openai("x", "not a url".into(), None)]).contains("`x`"));
        assert!(bad(vec![openai("x", "ftp://127.0.0.1:1".into(), None)]).contains("scheme"));
        assert!(bad(vec![openai("x", "http://203.0.113.5:1".into(), None)])
            .contains("allowed_networks"));
        assert!(bad(vec![openai("ollama", "http://127.0.0.1:1".into(), None)]).contains("twice"));
        assert!(bad(vec![openai(" ", "http://127.0.0.1:1".into(), None)]).contains("name"));
        let zero = LlmProbeConfig {
            timeout: Duration::ZERO,
            ..Default::default()
        };
        assert!(targets(&zero).unwrap_err().to_string().contains("timeout"));
    }

    #[test]
    fn config_reads_and_writes_toml() {
        let cfg: LlmProbeConfig = toml::from_str(
            r#"
            ollama_url = "off"
            timeout = "500ms"
            [[openai_endpoints]]
            name = "vllm"
            url = "http://127.0.0.1:8000"
            api_key_env = "VLLM_KEY"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.ollama(), None);
        assert_eq!(cfg.timeout, Duration::from_millis(500));
        assert_eq!(
            cfg.openai_endpoints[0].api_key_env.as_deref(),
            Some("VLLM_KEY")
        );
        let defaults: LlmProbeConfig = toml::from_str("").unwrap();
        assert_eq!(defaults, LlmProbeConfig::default());
        assert_eq!(defaults.ollama(), Some(DEFAULT_OLLAMA_URL));
        let round: LlmProbeConfig =
            toml::from_str(&toml::to_string(&LlmProbeConfig::disabled()).unwrap()).unwrap();
        assert_eq!(round.ollama(), None);
    }
}
