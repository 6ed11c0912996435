//! Generation shards: questions for a list of chunks with this worker's own LLM (or ICT).

use super::{ProgressCell, TaskEnv, TaskError};
use ragd_engine::data::llm::generate::{
    GenerateConfig, GenerateError, LlmGenerator, PromptTemplate, QueryGenerator,
};
use ragd_engine::data::llm::ict::{IctConfig, IctGenerator};
use ragd_engine::data::llm::ollama::{OllamaBackend, OllamaConfig};
use ragd_engine::data::llm::openai::{OpenAiBackend, OpenAiConfig};
use ragd_engine::data::llm::{LlmBackend, RequestPolicy, RetryPolicy};
use ragd_engine::data::prepare_job::with_progress;
use ragd_shared::protocol::jobs::{GenerateSpec, TaskOutput};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Checked generators by settings key.
pub type GeneratorCache =
    Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<dyn QueryGenerator>>>>;

fn settings_key(spec: &GenerateSpec) -> String {
    format!(
        "{}|{}|{}|{}|{}|{}|{}",
        spec.llm,
        spec.queries_per_chunk,
        spec.seed,
        spec.temperature,
        spec.max_tokens,
        spec.concurrency,
        spec.request_timeout_ms
    )
}

/// The configured OpenAI-compatible endpoint that serves `model`: the only one when there is
/// one, otherwise the first whose model list (probed now) has it.
async fn openai_endpoint_for(
    env: &TaskEnv,
    model: &str,
) -> Result<crate::capabilities::OpenAiEndpointConfig, TaskError> {
    let configured = &env.llm.openai_endpoints;
    match configured.len() {
        0 => Err(TaskError::invalid(
            "this worker has no OpenAI-compatible endpoint configured ([[llm.openai_endpoints]])",
        )),
        1 => Ok(configured[0].clone()),
        _ => {
            let probe = crate::capabilities::LlmProbeConfig {
                ollama_url: None,
                ..env.llm.clone()
            };
            let found = crate::capabilities::probe_llm_endpoints(&probe)
                .await
                .map_err(|e| TaskError::invalid(e.to_string()))?;
            let serving = found.iter().find(|ep| ep.models.iter().any(|m| m == model));
            match serving.and_then(|ep| configured.iter().find(|c| c.name.trim() == ep.name)) {
                Some(ep) => Ok(ep.clone()),
                None => Err(TaskError::invalid(format!(
                    "no OpenAI-compatible endpoint of this worker serves {model:?} (they serve: {})",
                    found
                        .iter()
                        .map(|ep| format!("{}: {}", ep.name, ep.models.join(", ")))
                        .collect::<Vec<_>>()
                        .join("; ")
                ))),
            }
        }
    }
}

/// The generator `spec.llm` names, built against this worker's configured endpoints.
async fn generator(
    env: &TaskEnv,
    spec: &GenerateSpec,
) -> Result<Arc<dyn QueryGenerator>, TaskError> {
    let (kind, model) = spec.llm.split_once(':').unwrap_or((spec.llm.as_str(), ""));
    let policy = RequestPolicy {
        concurrency: spec.concurrency.max(1) as usize,
        timeout: Duration::from_millis(spec.request_timeout_ms.max(100)),
        retry: RetryPolicy::default(),
    };
    let backend: Arc<dyn LlmBackend> = match kind {
        "ict" => {
            return Ok(Arc::new(IctGenerator::new(IctConfig {
                queries_per_chunk: spec.queries_per_chunk.max(1) as usize,
                seed: spec.seed,
                ..Default::default()
            })))
        }
        "ollama" if !model.is_empty() => {
            let Some(url) = env.llm.ollama_url.clone() else {
                return Err(TaskError::invalid(
                    "this worker has Ollama turned off (llm.ollama_url = \"off\")",
                ));
            };
            let mut c = OllamaConfig::new(model);
            c.base_url = url;
            c.policy = policy;
            Arc::new(OllamaBackend::new(c).map_err(|e| TaskError::invalid(e.to_string()))?)
        }
        "openai" if !model.is_empty() => {
            let ep = openai_endpoint_for(env, model).await?;
            let mut c = OpenAiConfig::new(ep.url.clone());
            c.model = Some(model.to_string());
            c.policy = policy;
            c.guard = env.llm.guard.clone();
            // The endpoint's own key when it names one (as the probe uses); otherwise the
            // process-wide RAGD_LLM_API_KEY / OPENAI_API_KEY that `new` read.
            if let Some(var) = ep.api_key_env.as_deref().filter(|v| !v.trim().is_empty()) {
                c.api_key = std::env::var(var).ok().filter(|k| !k.is_empty());
                c.api_key_source = var.to_string();
            }
            Arc::new(OpenAiBackend::new(c).map_err(|e| TaskError::invalid(e.to_string()))?)
        }
        _ => {
            return Err(TaskError::invalid(format!(
                "unknown generator {:?}: use ollama:MODEL, openai:MODEL or ict",
                spec.llm
            )))
        }
    };
    let config = GenerateConfig {
        queries_per_chunk: spec.queries_per_chunk.max(1) as usize,
        temperature: spec.temperature,
        max_tokens: spec.max_tokens,
        seed: spec.seed,
        concurrency: spec.concurrency.max(1) as usize,
        ..Default::default()
    };
    Ok(Arc::new(
        LlmGenerator::new(backend, PromptTemplate::default(), config)
            .map_err(|e| TaskError::invalid(e.to_string()))?,
    ))
}

/// Runs one generation shard; with `within`, no chunk starts once that much time has passed
/// since the shard began (the chunks not started are left out of the output).
pub(super) async fn run(
    env: &TaskEnv,
    spec: GenerateSpec,
    within: Option<Duration>,
    progress: ProgressCell,
    cancel: CancellationToken,
) -> Result<TaskOutput, TaskError> {
    let deadline = within.map(|w| tokio::time::Instant::now() + w);
    let key = settings_key(&spec);
    let cached = env
        .generators
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    let generator = match cached {
        Some(g) => g,
        None => {
            let g = generator(env, &spec).await?;
            g.check().await.map_err(|e| match e {
                GenerateError::InvalidPrompt(_) => TaskError::invalid(e.to_string()),
                other => TaskError::failed(other),
            })?;
            let mut cache = env.generators.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 16 {
                cache.clear();
            }
            cache.insert(key.clone(), g.clone());
            g
        }
    };
    let chunks = spec.chunks;
    progress.update(|p| {
        p.total = chunks.len() as u64;
        p.device = "llm".into();
    });
    let on_progress = |p: ragd_engine::data::Progress| {
        progress.update(|s| {
            s.done = p.done;
            s.total = p.total;
        })
    };
    let result = with_progress(on_progress, |tx| {
        let (generator, chunks, cancel) = (&generator, &chunks, &cancel);
        async move {
            match deadline {
                Some(d) => generator.generate_until(chunks, d, Some(&tx), cancel).await,
                None => generator.generate(chunks, Some(&tx), cancel).await,
            }
        }
    })
    .await;
    if result.is_err() {
        // Check the backend again next time (it may have lost the model or gone away).
        env.generators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }
    let generation = result.map_err(TaskError::failed)?;
    let info = generator.info();
    Ok(TaskOutput::Generated {
        questions: generation.queries,
        chunks_failed: generation.counts.chunks_failed as u64,
        generator: format!("{} {}", info.backend.kind, info.backend.model),
        tokens_per_second: generation.throughput.tokens_per_second,
    })
}
