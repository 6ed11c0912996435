//! The sharded generation stage: chunks are cut into shards run by lanes ([`super::shards`]);
//! every worker that can run the generator runs as many lanes as it has work slots. A shard that
//! keeps failing is set aside after `max_attempts` and reported, and the job carries on.

use super::drive::JobCtx;
use super::shards::{run_shards, ShardWork};
use super::JobError;
use super::JobSpec;
use ragd_engine::data::llm::generate::QueryGenerator;
use ragd_engine::data::llm::ict::{IctConfig, IctGenerator};
use ragd_engine::data::llm::mixed::{llm_order, LlmBudget};
use ragd_shared::protocol::admin::WorkerRecord;
use ragd_shared::protocol::capabilities::{Capabilities, LlmApi};
use ragd_shared::protocol::jobs::{
    Chunk, GenerateSpec, GenerateWithinSpec, GeneratedQuery, TaskOutput, TaskSpec,
};
use ragd_shared::protocol::GENERATE_WITHIN_VERSION;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a committed shard holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardOutput {
    /// The questions.
    pub questions: Vec<GeneratedQuery>,
    /// Chunks without a usable answer.
    pub chunks_failed: u64,
    /// Generator description.
    pub generator: String,
    /// Tokens per second.
    pub tokens_per_second: f64,
}

/// Whether a worker can run generator `llm`.
pub fn eligible(llm: &str, caps: &Capabilities) -> bool {
    let (kind, model) = llm.split_once(':').unwrap_or((llm, ""));
    let has = |api: LlmApi| {
        caps.llm_endpoints.iter().any(|e| {
            e.api == api
                && e.models
                    .iter()
                    .any(|m| m == model || m.strip_suffix(":latest") == Some(model))
        })
    };
    match kind {
        "ict" => true,
        "ollama" => has(LlmApi::Ollama),
        "openai" => has(LlmApi::OpenAiCompatible),
        _ => false,
    }
}

/// Resolves `auto`: the first Ollama model a ready worker lists, else ICT.
pub fn resolve_llm(ctx: &JobCtx, llm: &str) -> String {
    if llm != "auto" {
        return llm.to_string();
    }
    for w in ctx.registry.snapshot() {
        if !ctx.worker_ready(&w.id) {
            continue;
        }
        if let Some(caps) = &w.capabilities {
            for e in &caps.llm_endpoints {
                if e.api == LlmApi::Ollama {
                    if let Some(m) = e.models.first() {
                        return format!("ollama:{m}");
                    }
                }
            }
        }
    }
    "ict".into()
}

/// The generation shards' [`ShardWork`]: chunks in, questions out, on the workers that can run
/// the generator.
struct GenerateWork {
    llm: String,
    spec: JobSpec,
    /// The end of the LLM's time budget: a worker that speaks protocol v5 is told what is left
    /// of it with each shard, and starts no chunk after it.
    deadline: Option<Instant>,
}

impl ShardWork for GenerateWork {
    fn stage(&self) -> &'static str {
        "generate"
    }

    fn lanes(&self, _ctx: &JobCtx, w: &WorkerRecord) -> usize {
        match &w.capabilities {
            Some(caps) if eligible(&self.llm, caps) => {
                w.load.map(|l| l.total_slots).unwrap_or(1).max(1) as usize
            }
            _ => 0,
        }
    }

    fn waiting(&self) -> String {
        format!(
            "generate: no ready worker can run {}; waiting for one",
            self.llm
        )
    }

    async fn ready(&self, _ctx: &JobCtx, _worker: &str) -> Result<(), String> {
        Ok(())
    }

    fn spec(&self, ctx: &JobCtx, worker: &str, payload: &str) -> Result<TaskSpec, String> {
        let chunks: Vec<Chunk> = serde_json::from_str(payload).map_err(|e| e.to_string())?;
        let spec = &self.spec;
        let generate = GenerateSpec {
            chunks,
            llm: self.llm.clone(),
            queries_per_chunk: spec.queries_per_chunk,
            seed: spec.seed,
            temperature: 0.7,
            max_tokens: 256,
            concurrency: spec.llm_concurrency.max(1),
            request_timeout_ms: spec.llm_timeout_secs.max(1) * 1000,
        };
        let version = ctx.registry.protocol_version(worker).unwrap_or(0);
        Ok(match self.deadline {
            Some(d) if version >= GENERATE_WITHIN_VERSION => {
                TaskSpec::GenerateWithin(GenerateWithinSpec {
                    generate,
                    within_ms: d.saturating_duration_since(Instant::now()).as_millis() as u64,
                })
            }
            _ => TaskSpec::Generate(generate),
        })
    }

    fn commit(&self, _ctx: &JobCtx, _payload: &str, output: TaskOutput) -> Result<String, String> {
        match output {
            TaskOutput::Generated {
                questions,
                chunks_failed,
                generator,
                tokens_per_second,
            } => Ok(serde_json::to_string(&ShardOutput {
                questions,
                chunks_failed,
                generator,
                tokens_per_second,
            })
            .expect("shard output serialises")),
            other => Err(format!("unexpected output {other:?}")),
        }
    }
}

/// Creates the shard tasks (once) and runs them over the cluster until none is left, or until
/// `deadline` (no shard is leased after it; a v5 worker starts no chunk after it, an older one
/// finishes the shard it holds). Returns the questions in shard
/// order and the number of shards set aside (shards not reached by the deadline are neither).
pub async fn run_generation(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    llm: &str,
    chunks: &[Chunk],
    deadline: Option<Instant>,
    cancel: &CancellationToken,
) -> Result<(Vec<ShardOutput>, usize), JobError> {
    let past = || deadline.is_some_and(|d| Instant::now() >= d);
    let payloads: Vec<String> = chunks
        .chunks(spec.shard_size.max(1))
        .map(|s| serde_json::to_string(s).expect("chunks serialise"))
        .collect();
    let n = ctx.db.ensure_tasks(job, "generate", &payloads)?;
    ctx.db.event(
        job,
        &format!("generate: {} chunks in {n} shards with {llm}", chunks.len()),
    )?;
    let work = Arc::new(GenerateWork {
        llm: llm.to_string(),
        spec: spec.clone(),
        deadline,
    });
    run_shards(ctx, job, work, spec.max_attempts.max(1), deadline, cancel).await?;
    let mut outputs = Vec::new();
    let mut set_aside = 0;
    for t in ctx.db.tasks(job, "generate")? {
        match (t.state.as_str(), &t.output) {
            ("pending", _) if past() => {} // not reached within the budget
            ("done", Some(out)) => outputs.push(
                serde_json::from_str::<ShardOutput>(out)
                    .map_err(|e| JobError::stage("generate", format!("shard {}: {e}", t.idx)))?,
            ),
            _ => {
                set_aside += 1;
                ctx.db.event(
                    job,
                    &format!(
                        "generate: shard {} set aside after {} attempts: {}",
                        t.idx,
                        t.attempts,
                        t.last_error.as_deref().unwrap_or("unknown error")
                    ),
                )?;
            }
        }
    }
    Ok((outputs, set_aside))
}

/// `X+ict`: the LLM writes for the chunks its budget allows, taken in the seeded order
/// `generate-data` uses ([`llm_order`]), as shards over the workers; ICT (here, in-process: it
/// is string work) covers every chunk the LLM did not reach or gave nothing for. A time budget
/// counts from this call, so a coordinator restarted mid-stage gives the LLM a fresh budget for
/// the shards still pending. Returns the shards (ICT's last) and the shards set aside.
pub async fn run_with_ict(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    chunks: &[Chunk],
    cancel: &CancellationToken,
) -> Result<(Vec<ShardOutput>, usize), JobError> {
    let (llm, _) = spec.llm_with_ict();
    let order = llm_order(chunks, spec.seed);
    let (take, deadline) = match spec.budget() {
        LlmBudget::Chunks(n) => (n.min(chunks.len()), None),
        LlmBudget::Time(d) => (chunks.len(), Some(Instant::now() + d)),
    };
    let llm_chunks: Vec<Chunk> = order[..take].iter().map(|&i| chunks[i].clone()).collect();
    let (mut shards, set_aside) = if llm_chunks.is_empty() {
        (Vec::new(), 0)
    } else {
        run_generation(ctx, job, spec, llm, &llm_chunks, deadline, cancel).await?
    };
    let covered: HashSet<&str> = shards
        .iter()
        .flat_map(|s| s.questions.iter().map(|q| q.chunk_id.as_str()))
        .collect();
    let llm_chunks_covered = covered.len();
    let rest: Vec<Chunk> = chunks
        .iter()
        .filter(|c| !covered.contains(c.id.as_str()))
        .cloned()
        .collect();
    let ict = IctGenerator::new(IctConfig {
        queries_per_chunk: spec.queries_per_chunk.max(1) as usize,
        seed: spec.seed,
        ..Default::default()
    });
    let g = ict
        .generate(&rest, None, cancel)
        .await
        .map_err(|e| JobError::stage("generate", e))?;
    ctx.db.event(
        job,
        &format!(
            "generate: {llm} wrote questions for {llm_chunks_covered} chunks within its budget \
             ({}); ICT covers the other {} ({} sentences)",
            spec.llm_budget.as_deref().unwrap_or("30m"),
            rest.len(),
            g.queries.len()
        ),
    )?;
    shards.push(ShardOutput {
        questions: g.queries,
        chunks_failed: g.counts.chunks_failed as u64,
        generator: "ict".into(),
        tokens_per_second: 0.0,
    });
    Ok((shards, set_aside))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragd_shared::protocol::capabilities::LlmEndpoint;

    #[test]
    fn eligibility_follows_the_listed_models() {
        let mut caps = Capabilities {
            os: String::new(),
            arch: String::new(),
            hostname: String::new(),
            cpu_model: String::new(),
            logical_cores: 1,
            total_memory_bytes: 0,
            available_memory_bytes: 0,
            gpus: vec![],
            backends: vec![],
            llm_endpoints: vec![],
        };
        assert!(eligible("ict", &caps));
        assert!(!eligible("ollama:qwen2.5:3b", &caps));
        caps.llm_endpoints.push(LlmEndpoint {
            name: "ollama".into(),
            api: LlmApi::Ollama,
            url: "http://127.0.0.1:11434".into(),
            models: vec!["qwen2.5:3b".into(), "llama3.2:latest".into()],
        });
        assert!(eligible("ollama:qwen2.5:3b", &caps));
        assert!(eligible("ollama:llama3.2", &caps));
        assert!(!eligible("openai:qwen2.5:3b", &caps));
    }
}
