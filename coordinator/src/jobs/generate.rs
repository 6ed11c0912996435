//! The sharded generation stage. Chunks are cut into shards (one task each, created once); every
//! eligible worker runs as many lanes as it has work slots, and each lane leases the next pending
//! shard, runs it and commits the questions by (shard, attempt). A fast worker therefore takes
//! more shards. A lane whose worker is lost gives its shard back; a shard that keeps failing is
//! set aside after `max_attempts` and reported, and the job carries on.

use super::drive::{drive, DriveError, JobCtx};
use super::JobError;
use super::JobSpec;
use ragd_engine::data::llm::generate::QueryGenerator;
use ragd_engine::data::llm::ict::{IctConfig, IctGenerator};
use ragd_engine::data::llm::mixed::{llm_order, LlmBudget};
use ragd_shared::protocol::capabilities::{Capabilities, LlmApi};
use ragd_shared::protocol::jobs::{
    Chunk, GenerateSpec, GeneratedQuery, TaskOutput, TaskRef, TaskSpec, TaskStart,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
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

/// Creates the shard tasks (once) and runs them over the cluster until none is left, or until
/// `deadline` (no shard is leased after it; those leased finish). Returns the questions in shard
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
    let mut lanes: JoinSet<String> = JoinSet::new();
    let mut active: BTreeMap<String, usize> = BTreeMap::new();
    let mut announced_none = false;
    loop {
        if cancel.is_cancelled() {
            lanes.shutdown().await;
            return Err(JobError::Cancelled);
        }
        ctx.db
            .expire_leases(job, false, spec.max_attempts.max(1))
            .await?;
        let counts: BTreeMap<String, u64> =
            ctx.db.task_counts(job, "generate")?.into_iter().collect();
        let open = counts.get("pending").copied().unwrap_or(0)
            + counts.get("leased").copied().unwrap_or(0);
        let done = counts.get("done").copied().unwrap_or(0);
        ctx.set_live(
            job,
            "generate",
            format!(
                "generate: {done}/{n} shards done, {} set aside, lanes {:?}",
                counts.get("set_aside").copied().unwrap_or(0),
                active
            ),
        );
        let leased = counts.get("leased").copied().unwrap_or(0);
        if open == 0 || (past() && leased == 0) {
            break;
        }
        // Start lanes on eligible workers that have none.
        let mut any = !active.is_empty();
        for w in ctx.registry.snapshot() {
            let Some(caps) = &w.capabilities else {
                continue;
            };
            if past()
                || active.contains_key(&w.id)
                || !ctx.worker_ready(&w.id)
                || !eligible(llm, caps)
            {
                continue;
            }
            let slots = w.load.map(|l| l.total_slots).unwrap_or(1).max(1) as usize;
            for _ in 0..slots {
                let (ctx, job, id, llm) =
                    (ctx.clone(), job.to_string(), w.id.clone(), llm.to_string());
                let (spec, cancel) = (spec.clone(), cancel.clone());
                lanes.spawn(async move {
                    lane(&ctx, &job, &id, &llm, &spec, deadline, &cancel).await;
                    id
                });
            }
            active.insert(w.id.clone(), slots);
            any = true;
        }
        if !any && !announced_none {
            ctx.db.event(
                job,
                &format!("generate: no ready worker can run {llm}; waiting for one"),
            )?;
            announced_none = true;
        }
        tokio::select! {
            Some(ended) = lanes.join_next(), if !lanes.is_empty() => {
                if let Ok(id) = ended {
                    if let Some(n) = active.get_mut(&id) {
                        *n -= 1;
                        if *n == 0 { active.remove(&id); }
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    lanes.shutdown().await;
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

/// One lane: lease, run, commit, until no shard is pending or the worker is gone.
async fn lane(
    ctx: &JobCtx,
    job: &str,
    worker: &str,
    llm: &str,
    spec: &JobSpec,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
) {
    let mut committed = Vec::new();
    lane_loop(
        ctx,
        job,
        worker,
        llm,
        spec,
        deadline,
        cancel,
        &mut committed,
    )
    .await;
    // What the last request could not carry: the worker may drop these results now.
    if let Some(conn) = ctx.supervisor.connection(worker) {
        for task in &committed {
            let _ = super::remote::forget(&conn, task).await;
        }
    }
}

/// The body of [`lane`]: returns when the lane is done. Results it has committed wait in
/// `committed` until the next task's request tells the worker to forget them.
#[allow(clippy::too_many_arguments)]
async fn lane_loop(
    ctx: &JobCtx,
    job: &str,
    worker: &str,
    llm: &str,
    spec: &JobSpec,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
    committed: &mut Vec<TaskRef>,
) {
    let ttl = ctx.lease_ttl.as_millis() as u64;
    let max_attempts = spec.max_attempts.max(1);
    let mut failed_here: HashSet<String> = HashSet::new();
    loop {
        let past = deadline.is_some_and(|d| Instant::now() >= d);
        if past || cancel.is_cancelled() || !ctx.worker_ready(worker) {
            return;
        }
        // The shard's `seconds`: from asking for the lease to handing the result to the writer.
        let t0 = Instant::now();
        let task = match ctx.db.lease_next(job, "generate", worker, ttl).await {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot lease a shard");
                return;
            }
        };
        let chunks: Vec<Chunk> = match serde_json::from_str(&task.payload) {
            Ok(c) => c,
            Err(e) => {
                let _ = ctx
                    .db
                    .release(&task.id, task.attempts, &e.to_string(), 0)
                    .await;
                continue;
            }
        };
        let tref = TaskRef {
            task_id: task.id.clone(),
            attempt: task.attempts,
        };
        let start = TaskStart {
            task: tref.clone(),
            job_id: job.to_string(),
            spec: TaskSpec::Generate(GenerateSpec {
                chunks,
                llm: llm.to_string(),
                queries_per_chunk: spec.queries_per_chunk,
                seed: spec.seed,
                temperature: 0.7,
                max_tokens: 256,
                concurrency: spec.llm_concurrency.max(1),
                request_timeout_ms: spec.llm_timeout_secs.max(1) * 1000,
            }),
        };
        let forget = std::mem::take(committed);
        let result = drive(ctx, worker, start, forget, true, cancel, |_| async {}).await;
        match result {
            Ok(TaskOutput::Generated {
                questions,
                chunks_failed,
                generator,
                tokens_per_second,
            }) => {
                let n = questions.len();
                let out = ShardOutput {
                    questions,
                    chunks_failed,
                    generator,
                    tokens_per_second,
                };
                let json = serde_json::to_string(&out).expect("shard output serialises");
                let secs = t0.elapsed().as_secs_f64();
                match ctx
                    .db
                    .commit_task(&task.id, task.attempts, worker, &json, secs)
                    .await
                {
                    Ok(true) => tracing::debug!(
                        job,
                        worker,
                        shard = task.idx,
                        questions = n,
                        "shard committed"
                    ),
                    Ok(false) => tracing::info!(
                        job,
                        worker,
                        shard = task.idx,
                        "late result of a re-leased shard ignored"
                    ),
                    Err(e) => tracing::warn!(error = %e, "shard commit failed"),
                }
                committed.push(tref);
            }
            Ok(other) => {
                let msg = format!("unexpected output {other:?}");
                let _ = ctx
                    .db
                    .release(&task.id, task.attempts, &msg, max_attempts)
                    .await;
            }
            Err(DriveError::Cancelled) => {
                let _ = ctx
                    .db
                    .release(&task.id, task.attempts, "cancelled", u32::MAX)
                    .await;
                return;
            }
            Err(DriveError::LeaseLost) => {}
            Err(DriveError::Lost(why)) => {
                let _ = ctx.db.event(
                    job,
                    &format!(
                        "generate: worker {worker} lost during shard {} ({why}); shard goes back",
                        task.idx
                    ),
                );
                let _ = ctx
                    .db
                    .release(&task.id, task.attempts, &why, max_attempts)
                    .await;
                return;
            }
            Err(DriveError::Failed { message, retryable }) => {
                tracing::warn!(job, worker, shard = task.idx, error = %message, "shard failed");
                let limit = if retryable { max_attempts } else { 0 };
                let _ = ctx
                    .db
                    .release(&task.id, task.attempts, &message, limit)
                    .await;
                // A worker that fails the same shard twice leaves it to the others.
                if !failed_here.insert(task.id.clone()) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
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
