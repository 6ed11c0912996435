//! `ragd-coord submit`, `jobs ...` and `models ...`: the job commands of the CLI, talking to the
//! daemon over the admin socket.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ragd_coordinator::admin::{AdminRequest, AdminResponse};
use ragd_coordinator::config::CoordinatorConfig;
use ragd_coordinator::jobs::local::{EvalOutput, QuestionsEval};
use ragd_coordinator::jobs::JobSpec;
use ragd_coordinator::jobs::ModelKind;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The corpus directory (.md, .txt, .rst, .html, ragd chunk exports).
    #[arg(long)]
    corpus: PathBuf,
    /// The base model: a sentence-transformers directory on this machine.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    base_model: PathBuf,
    /// Question generator: auto, ict, ollama:MODEL or openai:MODEL; append `+ict`
    /// (`ollama:MODEL+ict`) to have the LLM write within --llm-budget and ICT cover the rest.
    #[arg(long, default_value = "auto")]
    llm: String,
    /// With `--llm X+ict`: how much the LLM writes, in chunks (`500`) or minutes (`30m`, the
    /// default).
    #[arg(long)]
    llm_budget: Option<String>,
    /// Where to write the fine-tuned model (default: the state directory's models/JOB).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Train on this worker.
    #[arg(long)]
    on: Option<String>,
    /// Prefer `gpu` or `cpu` workers for training.
    #[arg(long)]
    prefer: Option<String>,
    /// Questions per chunk.
    #[arg(long, default_value_t = 2)]
    queries_per_chunk: u32,
    /// Chunks per generation shard (the prepare stage's embedding shards carry 16 texts per
    /// chunk of it: 128 by default).
    #[arg(long, default_value_t = 8)]
    shard_size: usize,
    /// Chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    chunk_size: usize,
    /// Chunk overlap in tokens.
    #[arg(long, default_value_t = 50)]
    chunk_overlap: usize,
    /// Smallest chunk in tokens.
    #[arg(long, default_value_t = 100)]
    chunk_min: usize,
    /// Hard negatives per query.
    #[arg(long, default_value_t = 3)]
    negatives: usize,
    /// Share of chunks held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    test_fraction: f64,
    /// Round-trip filter top-k (0 disables).
    #[arg(long, default_value_t = 5)]
    round_trip_k: usize,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Pairs per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    /// Tokens per text during training.
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Stop training after this many steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Checkpoint (and bring it home) every N steps.
    #[arg(long, default_value_t = 20)]
    checkpoint_every: usize,
    /// Attempts each task gets (a lost worker costs the task it ran one) before it is set aside
    /// and the job fails; training gets two more.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Train with MatryoshkaLoss (384, 256, 128, 64 cut to the width), for users who truncate
    /// embeddings; off by default: on real questions it gave no gain at 128 or 64 dimensions
    /// and less at full width (engine/TRAINING.md, "Matryoshka").
    #[arg(long)]
    matryoshka: bool,
    /// Seed of every stage.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Models to fine-tune: embedder, reranker, or embedder,reranker.
    #[arg(long, default_value = "embedder")]
    train: String,
    /// Reranker starting point: a cross-encoder directory, or an encoder that gets a new head
    /// (default: the base model).
    #[arg(long)]
    reranker_base: Option<PathBuf>,
    /// Your own questions, to judge the job by: a BEIR directory, or JSONL lines
    /// `{"query", "relevant": [chunk ids or passages]}` (on the coordinator's machine). They are
    /// the headline of the evaluation and decide the verdict.
    #[arg(long)]
    eval_queries: Option<PathBuf>,
    /// Reranker loss: bce, mnrl or lambda.
    #[arg(long, default_value = "bce")]
    reranker_loss: String,
    /// Hard negatives per query for the reranker (default: all that were mined).
    #[arg(long)]
    reranker_negatives: Option<usize>,
    /// Reranker passes over the data.
    #[arg(long, default_value_t = JobSpec::default().reranker_epochs)]
    reranker_epochs: usize,
    /// Reranker queries per batch.
    #[arg(long, default_value_t = JobSpec::default().reranker_batch_size)]
    reranker_batch_size: usize,
    /// Reranker peak learning rate (of the encoder; a new head moves faster, see below).
    #[arg(long, default_value_t = JobSpec::default().reranker_lr)]
    reranker_lr: f64,
    /// Learning-rate multiplier of a new reranker head.
    #[arg(long, default_value_t = JobSpec::default().reranker_head_lr_scale)]
    reranker_head_lr_scale: f64,
    /// Tokens per (query, passage) pair while training the reranker.
    #[arg(long)]
    reranker_max_seq_len: Option<usize>,
    /// Stop reranker training after this many steps.
    #[arg(long)]
    reranker_max_steps: Option<usize>,
    /// Candidates per held-out query the reranker reorders in the evaluation.
    #[arg(long, default_value_t = JobSpec::default().rerank_depth)]
    rerank_depth: usize,
    /// Replace a model a previous job exported at --out (files ragd did not write are never
    /// replaced: a non-empty directory without its export marker is refused).
    #[arg(long)]
    force: bool,
    /// Follow the job until it ends, printing progress.
    #[arg(long)]
    follow: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `jobs` actions.
#[derive(Debug, Subcommand)]
pub enum JobsAction {
    /// One job in detail: stages, where they ran and why, progress, evaluation.
    Show {
        /// Job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A job's log.
    Logs {
        /// Job id.
        id: String,
        /// Keep printing new lines until the job ends.
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a running job (its remote work stops within seconds).
    Cancel {
        /// Job id.
        id: String,
    },
    /// Write the job's HTML report again (e.g. after an upgrade) and print its path.
    Report {
        /// Job id.
        id: String,
    },
}

/// `models` actions.
#[derive(Debug, Subcommand)]
pub enum ModelsAction {
    /// List registered models.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a model the active one (refused when it evaluates worse than its base).
    Promote {
        /// Model id (its job's id).
        id: String,
        /// Promote even if it evaluates worse than its base.
        #[arg(long)]
        force: bool,
    },
    /// Go back to the previously promoted model of a kind.
    Rollback {
        /// `embedder` or `reranker`.
        #[arg(long, default_value = "embedder")]
        kind: String,
    },
}

async fn json_request(cfg: &CoordinatorConfig, req: AdminRequest) -> anyhow::Result<Value> {
    match ragd_coordinator::admin_request(cfg, req).await? {
        AdminResponse::Json(s) => Ok(serde_json::from_str(&s)?),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// Runs `submit`.
pub async fn submit(cfg: &CoordinatorConfig, a: SubmitArgs) -> anyhow::Result<()> {
    let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    let spec = JobSpec {
        corpus: abs(&a.corpus),
        base_model: abs(&a.base_model),
        llm: a.llm,
        llm_budget: a.llm_budget,
        out: a.out.as_ref().map(abs),
        on: a.on,
        prefer: a.prefer,
        queries_per_chunk: a.queries_per_chunk,
        shard_size: a.shard_size,
        chunk_size: a.chunk_size,
        chunk_overlap: a.chunk_overlap,
        chunk_min: a.chunk_min,
        negatives: a.negatives,
        test_fraction: a.test_fraction,
        round_trip_k: a.round_trip_k,
        seed: a.seed,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        max_seq_len: a.max_seq_len,
        max_steps: a.max_steps,
        checkpoint_every: a.checkpoint_every,
        max_attempts: a.max_attempts,
        matryoshka: a.matryoshka,
        train: ModelKind::parse_list(&a.train).map_err(anyhow::Error::msg)?,
        reranker_base: a.reranker_base.as_ref().map(abs),
        eval_queries: a.eval_queries.as_ref().map(abs),
        reranker_loss: a.reranker_loss,
        reranker_negatives: a.reranker_negatives,
        reranker_epochs: a.reranker_epochs,
        reranker_batch_size: a.reranker_batch_size,
        reranker_lr: a.reranker_lr,
        reranker_head_lr_scale: a.reranker_head_lr_scale,
        reranker_max_seq_len: a.reranker_max_seq_len,
        reranker_max_steps: a.reranker_max_steps,
        rerank_depth: a.rerank_depth,
        force: a.force,
        ..Default::default()
    };
    spec.validate().map_err(anyhow::Error::msg)?;
    let spec = Box::new(spec);
    let v = json_request(cfg, AdminRequest::Submit { spec }).await?;
    let id = v["id"]
        .as_str()
        .context("no job id in the answer")?
        .to_string();
    if a.json && !a.follow {
        println!("{v}");
        return Ok(());
    }
    println!("submitted {id}");
    if a.follow {
        follow(cfg, &id).await?;
    }
    Ok(())
}

/// Prints a job's progress until it ends, then its results.
async fn follow(cfg: &CoordinatorConfig, id: &str) -> anyhow::Result<()> {
    let mut after = 0i64;
    let mut last_live = Vec::<String>::new();
    loop {
        let logs = json_request(
            cfg,
            AdminRequest::JobLogs {
                id: id.to_string(),
                after,
            },
        )
        .await?;
        for entry in logs.as_array().into_iter().flatten() {
            after = entry[0].as_i64().unwrap_or(after);
            println!("{}", entry[1].as_str().unwrap_or_default());
        }
        let v = json_request(cfg, AdminRequest::ShowJob { id: id.to_string() }).await?;
        let live: Vec<String> = v["live"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str().map(String::from))
            .collect();
        for l in &live {
            if !last_live.contains(l) {
                eprintln!("  {l}");
            }
        }
        last_live = live;
        let state = v["state"].as_str().unwrap_or_default().to_string();
        if state != "running" {
            print_result(&v);
            if state != "succeeded" {
                bail!("job {id} {state}");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The evaluation on the user's own questions (the headline, with the verdict).
fn print_questions(q: &QuestionsEval, verdict: Option<&ragd_engine::eval::compare::Comparison>) {
    let source = q.source.display();
    println!();
    if let Some(error) = &q.error {
        println!("Your questions ({source}) could not be used: {error}");
        println!("The held-out queries below decide the verdict.");
        return;
    }
    println!("Your questions ({source}, {} of them):", q.queries);
    println!(
        "{}",
        ragd_engine::eval::format_table(&q.tuned, Some(&q.base))
    );
    if let Some(c) = verdict {
        println!("{c}");
    }
    if let Some(first) = q.unmatched.first() {
        println!(
            "warning: {} relevant entries matched no chunk (questions with none are left out), e.g. {first}",
            q.unmatched.len()
        );
    }
}

/// Whether the fine-tuned reranker (the last row) beats every other pipeline on NDCG@10;
/// `None` without a reranking evaluation.
fn reranker_verdict(rows: &[ragd_engine::rerank::eval::RerankMetrics]) -> Option<bool> {
    let (tuned, others) = rows.split_last()?;
    Some(!others.is_empty() && others.iter().all(|o| tuned.ndcg_at_10 > o.ndcg_at_10))
}

fn print_result(v: &Value) {
    let mut reranker_helps = None;
    let evaluation: Option<EvalOutput> = v
        .get("evaluation")
        .and_then(|e| serde_json::from_value(e.clone()).ok());
    if let Some(e) = evaluation {
        if let Some(q) = &e.questions {
            print_questions(q, e.comparison.as_ref());
        }
        if !e.tuned.is_empty() {
            println!();
            if e.questions.is_some() {
                println!("Held-out generated queries:");
            }
            println!(
                "{}",
                ragd_engine::eval::format_table(&e.tuned, Some(&e.base))
            );
        }
        // Usable questions took the headline; otherwise `comparison` is the held-out one.
        let held_out = match e.questions.as_ref().filter(|q| q.error.is_none()) {
            Some(_) => e.held_out_comparison.as_ref(),
            None => e.comparison.as_ref(),
        };
        if let Some(c) = held_out {
            println!("{c}");
        }
        if !e.tuned.is_empty() && (e.held_out_all_ict || v["spec"]["llm"].as_str() == Some("ict")) {
            println!(
                "note: the held-out queries are ICT sentences copied out of their chunks; they overstate gains. \
                 Judge by your own questions (`submit --eval-queries FILE`)."
            );
        }
        if !e.rerank.is_empty() {
            println!();
            println!("Reranking the held-out queries:");
            println!("{}", ragd_engine::rerank::eval::format_table(&e.rerank));
        }
        reranker_helps = reranker_verdict(&e.rerank);
    }
    let id = v["id"].as_str().unwrap_or_default();
    let embedder = v["model_path"].as_str();
    let reranker = v["reranker_path"].as_str();
    let use_reranker = reranker.filter(|_| reranker_helps != Some(false));
    if embedder.is_some() || use_reranker.is_some() {
        println!("To use them in ragd, set in its configuration:");
    }
    if let Some(path) = embedder {
        println!("  [embedding]");
        println!("  custom_model_path = \"{path}\"");
    }
    if let Some(path) = use_reranker {
        println!("  [reranking]");
        println!("  custom_model_path = \"{path}\"");
    }
    if let Some(path) = embedder {
        println!("Fine-tuned embedder: {path}  (`ragd-coord models promote {id}` marks it active; refused unless its verdict is \"better\")");
    }
    if let Some(path) = reranker {
        println!(
            "Fine-tuned reranker: {path}  (`ragd-coord models promote {id}-reranker` marks it \
             active; refused unless it beats the embedder alone)"
        );
    }
    if let (Some(false), Some(rows)) = (reranker_helps, v["evaluation"]["rerank"].as_array()) {
        let ndcg = |r: &Value| r["ndcg_at_10"].as_f64().unwrap_or(0.0);
        println!(
            "The fine-tuned reranker does not beat the embedder alone (NDCG@10 {:.4} vs {:.4}), so \
             it is left out of the configuration above. Train it on more rows or for longer \
             (--reranker-epochs, --reranker-max-steps), or start from a cross-encoder \
             (--reranker-base DIR).",
            rows.last().map_or(0.0, ndcg),
            rows.first().map_or(0.0, ndcg)
        );
    }
    if let Some(e) = v["error"].as_str() {
        println!("error: {e}");
    }
}

fn print_show(v: &Value) {
    println!(
        "job {}  {}  (created {}, updated {})",
        v["id"].as_str().unwrap_or_default(),
        v["state"].as_str().unwrap_or_default(),
        v["created"].as_str().unwrap_or_default(),
        v["updated"].as_str().unwrap_or_default()
    );
    println!("corpus {}", v["corpus"].as_str().unwrap_or_default());
    for s in v["stages"].as_array().into_iter().flatten() {
        println!(
            "  {:<9} {:<8} {:<22} {}",
            s["name"].as_str().unwrap_or_default(),
            s["state"].as_str().unwrap_or_default(),
            s["ran_on"].as_str().unwrap_or("-"),
            s["why"].as_str().unwrap_or("")
        );
    }
    for w in v["generation_by_worker"].as_array().into_iter().flatten() {
        println!(
            "  generation on {}: {} shards, {} questions, {:.1}s",
            w["worker"].as_str().unwrap_or_default(),
            w["shards"],
            w["queries"],
            w["seconds"].as_f64().unwrap_or(0.0)
        );
    }
    for l in v["live"].as_array().into_iter().flatten() {
        println!("  {}", l.as_str().unwrap_or_default());
    }
    if !v["checkpoint"].is_null() {
        println!("  last checkpoint home: step {}", v["checkpoint"]);
    }
    print_result(v);
    println!("recent:");
    for e in v["events"].as_array().into_iter().flatten() {
        println!("  {}", e.as_str().unwrap_or_default());
    }
}

/// Runs `jobs [ACTION]`.
pub async fn jobs(
    cfg: &CoordinatorConfig,
    json: bool,
    action: Option<JobsAction>,
) -> anyhow::Result<()> {
    match action {
        None => {
            let v = json_request(cfg, AdminRequest::ListJobs).await?;
            if json {
                println!("{v}");
                return Ok(());
            }
            let rows = v.as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                println!("No jobs yet: `ragd-coord submit --corpus DIR` starts one.");
            }
            for j in rows {
                println!(
                    "{:<30} {:<10} {:<9} {}",
                    j["id"].as_str().unwrap_or_default(),
                    j["state"].as_str().unwrap_or_default(),
                    j["stage"].as_str().unwrap_or("-"),
                    j["corpus"].as_str().unwrap_or_default()
                );
            }
        }
        Some(JobsAction::Show { id, json: j }) => {
            let v = json_request(cfg, AdminRequest::ShowJob { id }).await?;
            if json || j {
                println!("{v}");
            } else {
                print_show(&v);
            }
        }
        Some(JobsAction::Logs { id, follow: f }) => {
            if f {
                return follow(cfg, &id).await;
            }
            let v = json_request(cfg, AdminRequest::JobLogs { id, after: 0 }).await?;
            for entry in v.as_array().into_iter().flatten() {
                println!("{}", entry[1].as_str().unwrap_or_default());
            }
        }
        Some(JobsAction::Cancel { id }) => {
            json_request(cfg, AdminRequest::CancelJob { id: id.clone() }).await?;
            println!("cancelling {id}: its remote work is being stopped");
        }
        Some(JobsAction::Report { id }) => {
            let v = json_request(cfg, AdminRequest::WriteReport { id }).await?;
            println!("{}", v["report"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// Runs `models ACTION`.
pub async fn models(cfg: &CoordinatorConfig, action: ModelsAction) -> anyhow::Result<()> {
    match action {
        ModelsAction::List { json } => {
            let v = json_request(cfg, AdminRequest::ListModels).await?;
            if json {
                println!("{v}");
                return Ok(());
            }
            for m in v.as_array().into_iter().flatten() {
                println!(
                    "{} {:<39} {:<8} ndcg@10 {} (base {})  {}",
                    if m["active"].as_bool() == Some(true) {
                        "*"
                    } else {
                        " "
                    },
                    m["id"].as_str().unwrap_or_default(),
                    m["kind"].as_str().unwrap_or("embedder"),
                    m["ndcg@10"]
                        .as_f64()
                        .map_or("-".into(), |x| format!("{x:.4}")),
                    m["base_ndcg@10"]
                        .as_f64()
                        .map_or("-".into(), |x| format!("{x:.4}")),
                    m["path"].as_str().unwrap_or_default()
                );
            }
        }
        ModelsAction::Promote { id, force } => {
            let v = json_request(cfg, AdminRequest::PromoteModel { id, force }).await?;
            println!(
                "promoted {} ({})",
                v["promoted"].as_str().unwrap_or_default(),
                v["path"].as_str().unwrap_or_default()
            );
        }
        ModelsAction::Rollback { kind } => {
            let v = json_request(cfg, AdminRequest::RollbackModelKind { kind }).await?;
            println!(
                "rolled back: {} is active again",
                v["promoted"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}
