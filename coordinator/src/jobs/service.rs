//! The job table of a running coordinator: submit, list, show, cancel, logs, models; one owned
//! task per running job, resumed from the database after a restart.

use super::drive::JobCtx;
use super::export;
use super::generate::{self, ShardOutput};
use super::local::{self, EvalOutput, IngestOutput, PrepareOutput};
use super::prepare;
use super::rerank;
use super::train::{self, TrainInputs, TrainKind, TrainOutput};
use super::{JobError, JobSpec, ModelKind};
use ragd_shared::protocol::jobs::{BlobId, Chunk};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The coordinator's jobs.
pub struct JobService {
    pub(super) ctx: JobCtx,
    running: Mutex<HashMap<String, CancellationToken>>,
    tasks: Mutex<JoinSet<()>>,
    shutdown: CancellationToken,
}

/// Refuses, before the job starts, an `--out` (or its `-reranker` sibling) that holds files ragd
/// did not write, or another job's export without `--force`.
fn check_destinations(spec: &JobSpec) -> Result<(), String> {
    let Some(out) = &spec.out else {
        return Ok(());
    };
    let mut dests = Vec::new();
    if spec.trains(ModelKind::Embedder) {
        dests.push(out.clone());
    }
    if spec.trains(ModelKind::Reranker) {
        dests.push(rerank::reranker_dest(out));
    }
    for d in dests {
        export::check_destination(&d, None, spec.force).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn blob(hex: &str, stage: &'static str) -> Result<BlobId, JobError> {
    BlobId::from_hex(hex).ok_or_else(|| JobError::stage(stage, format!("bad blob id {hex:?}")))
}

impl JobService {
    /// Builds the service and resumes the jobs that were running.
    pub fn start(ctx: JobCtx, shutdown: CancellationToken) -> Result<Arc<Self>, JobError> {
        let this = Arc::new(Self {
            ctx,
            running: Mutex::default(),
            tasks: Mutex::new(JoinSet::new()),
            shutdown,
        });
        let mut stale = Vec::new();
        for job in this.ctx.db.jobs()? {
            if job.state == "running" {
                let spec: JobSpec = serde_json::from_str(&job.spec).unwrap_or_default();
                stale.extend(this.ctx.db.leases(&job.id)?);
                let n = futures::executor::block_on(this.ctx.db.expire_leases(
                    &job.id,
                    true,
                    u32::MAX,
                ))?;
                this.ctx.db.event(
                    &job.id,
                    &format!("coordinator restarted: resuming the job ({n} leased tasks go back)"),
                )?;
                this.spawn_job(job.id.clone(), spec);
            }
        }
        if !stale.is_empty() {
            let (ctx, cancel) = (this.ctx.clone(), this.shutdown.clone());
            this.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .spawn(cancel_stale_attempts(ctx, stale, cancel));
        }
        Ok(this)
    }

    fn spawn_job(self: &Arc<Self>, id: String, spec: JobSpec) {
        let cancel = self.shutdown.child_token();
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), cancel.clone());
        let this = self.clone();
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(async move {
                let result = this.run_job(&id, &spec, &cancel).await;
                let db = &this.ctx.db;
                match result {
                    Ok(()) => {
                        let _ = db.set_job_state(&id, "succeeded", None);
                        let _ = db.event(&id, "job succeeded");
                    }
                    Err(JobError::Cancelled) if this.shutdown.is_cancelled() => {
                        // Coordinator shutdown: the job stays `running` and resumes at start-up.
                    }
                    Err(JobError::Cancelled) => {
                        let _ = db.set_job_state(&id, "cancelled", None);
                        let _ = db.event(&id, "job cancelled");
                    }
                    Err(e) => {
                        let _ = db.set_job_state(&id, "failed", Some(&e.to_string()));
                        let _ = db.event(&id, &format!("job failed: {e}"));
                    }
                }
                if !this.shutdown.is_cancelled() {
                    let _ = this.write_report(&id);
                }
                this.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
    }

    /// Validates and starts a job; returns its id.
    pub fn submit(self: &Arc<Self>, spec: JobSpec) -> Result<String, String> {
        spec.validate()?;
        check_destinations(&spec)?;
        if let Some(path) = &spec.eval_queries {
            ragd_engine::eval::questions::read(path).map_err(|e| e.to_string())?;
        }
        let id = format!(
            "job-{}-{:04x}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string()
                .replace([':', '-'], "")
                .trim_end_matches('Z')
                .replace('T', "-"),
            rand::random::<u16>()
        );
        let json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
        self.ctx
            .db
            .create_job(&id, &json, &spec.stages())
            .map_err(|e| e.to_string())?;
        self.spawn_job(id.clone(), spec);
        Ok(id)
    }

    /// Cancels a running job (its remote tasks are told to stop).
    pub fn cancel(&self, id: &str) -> Result<(), String> {
        let job = self.ctx.db.job(id).map_err(|e| e.to_string())?;
        match self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            Some(token) => {
                token.cancel();
                Ok(())
            }
            None => Err(format!("job {id} is not running (it is {})", job.state)),
        }
    }

    /// Stops every job task (the jobs stay `running` in the database and resume later).
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        while tasks.join_next().await.is_some() {}
    }

    /// The recorded outputs of the stages of `job` that finished (before a restart).
    fn finished_stages(&self, job: &str) -> Result<HashMap<String, String>, JobError> {
        Ok(self
            .ctx
            .db
            .stages(job)?
            .into_iter()
            .filter(|s| s.state == "done")
            .filter_map(|s| s.output.map(|o| (s.name, o)))
            .collect())
    }

    /// Runs the stages of `job` in order, each skipped when it finished before (its recorded
    /// output read back instead).
    async fn run_job(
        &self,
        job: &str,
        spec: &JobSpec,
        cancel: &CancellationToken,
    ) -> Result<(), JobError> {
        let ctx = &self.ctx;
        let done = self.finished_stages(job)?;
        let (ingested, chunks) = self.ingest_stage(job, spec, &done, cancel).await?;
        let shards = self
            .generate_stage(job, spec, &ingested, &chunks, &done, cancel)
            .await?;
        let prepared = self
            .prepare_stage(job, spec, &ingested, chunks, &shards, &done, cancel)
            .await?;
        if prepared.train_records < spec.batch_size {
            return Err(JobError::stage(
                "prepare",
                format!(
                    "only {} training records for a batch size of {}: give a larger corpus or a smaller --batch-size",
                    prepared.train_records, spec.batch_size
                ),
            ));
        }
        // Train on the best node: the embedder, then the reranker (each its own stage).
        let trained = match spec.trains(ModelKind::Embedder) {
            true => {
                let inputs = || train::embedder_inputs(ctx, spec, &prepared);
                Some(
                    self.train_stage(job, spec, TrainKind::Embedder, inputs, &done, cancel)
                        .await?,
                )
            }
            false => None,
        };
        let reranker = match spec.trains(ModelKind::Reranker) {
            true => {
                let inputs = || rerank::reranker_inputs(ctx, spec, &prepared);
                Some(
                    self.train_stage(job, spec, TrainKind::Reranker, inputs, &done, cancel)
                        .await?,
                )
            }
            false => None,
        };
        let model_dir = match &trained {
            Some(t) => {
                let dir = local::job_dir(ctx, job).join("model");
                local::export_model(ctx, &blob(&t.model, "train")?, &dir)?;
                dir
            }
            None => spec.base_model.clone(),
        };
        let reranker_dir = match &reranker {
            Some(r) => {
                let dir = local::job_dir(ctx, job).join("reranker");
                local::export_model(ctx, &blob(&r.model, "train_reranker")?, &dir)?;
                Some(dir)
            }
            None => None,
        };
        let tuned = trained.as_ref().map(|_| model_dir.as_path());
        let evaluated = self
            .evaluate_stage(
                job,
                spec,
                &prepared,
                (tuned, &model_dir),
                reranker_dir.as_deref(),
                &done,
            )
            .await?;
        self.export_stage(job, spec, trained.as_ref(), reranker.as_ref(), &evaluated)
    }

    /// Ingest: always cheap and deterministic, so re-read (not stored) when it was recorded.
    async fn ingest_stage(
        &self,
        job: &str,
        spec: &JobSpec,
        done: &HashMap<String, String>,
        cancel: &CancellationToken,
    ) -> Result<(IngestOutput, Vec<Chunk>), JobError> {
        let (ctx, db) = (&self.ctx, &self.ctx.db);
        let parse = |stage: &'static str, v: &str| -> Result<Value, JobError> {
            serde_json::from_str(v).map_err(|e| JobError::stage(stage, e))
        };
        Ok(match done.get("ingest") {
            Some(o) => {
                let out: IngestOutput = serde_json::from_value(parse("ingest", o)?)
                    .map_err(|e| JobError::stage("ingest", e))?;
                let chunks = local::read_chunks(ctx, &out)?;
                (out, chunks)
            }
            None => {
                db.stage_started(job, "ingest")?;
                db.stage_placed(
                    job,
                    "ingest",
                    "coordinator",
                    "the corpus is on the coordinator's machine",
                )?;
                let (out, chunks) = local::ingest(ctx, spec, cancel).await?;
                db.stage_done(
                    job,
                    "ingest",
                    &serde_json::to_string(&out).unwrap_or_default(),
                    None,
                )?;
                db.event(job, &format!("ingest: {} chunks", out.chunks))?;
                (out, chunks)
            }
        })
    }

    /// Generate (sharded over the workers with an LLM), cached by its inputs across jobs.
    async fn generate_stage(
        &self,
        job: &str,
        spec: &JobSpec,
        ingested: &IngestOutput,
        chunks: &[Chunk],
        done: &HashMap<String, String>,
        cancel: &CancellationToken,
    ) -> Result<Vec<ShardOutput>, JobError> {
        let (ctx, db) = (&self.ctx, &self.ctx.db);
        let llm = generate::resolve_llm(ctx, &spec.llm);
        let gen_key = blake3::hash(
            format!(
                "{}|{llm}|{}|{}|{}|{:?}",
                ingested.chunks_blob,
                spec.queries_per_chunk,
                spec.seed,
                spec.shard_size,
                spec.llm_budget
            )
            .as_bytes(),
        )
        .to_hex()
        .to_string();
        Ok(match done.get("generate") {
            Some(o) => serde_json::from_str::<GenerateOutput>(o)
                .map_err(|e| JobError::stage("generate", e))?
                .load(ctx)?,
            None => {
                db.stage_started(job, "generate")?;
                let cached = db.cached("generate", &gen_key)?;
                let out = match cached.and_then(|c| serde_json::from_str::<GenerateOutput>(&c).ok())
                {
                    Some(out) if out.load(ctx).is_ok() => {
                        db.event(job, "generate: inputs unchanged since an earlier job; reusing its questions")?;
                        out
                    }
                    _ => {
                        db.stage_placed(
                            job,
                            "generate",
                            "workers with an LLM",
                            &format!("{llm}; shards pulled by capacity"),
                        )?;
                        let (shards, set_aside) = if spec.llm_with_ict().1 {
                            generate::run_with_ict(ctx, job, spec, chunks, cancel).await?
                        } else {
                            generate::run_generation(ctx, job, spec, &llm, chunks, None, cancel)
                                .await?
                        };
                        let bytes = serde_json::to_vec(&shards).expect("shards serialise");
                        let id = ctx.blobs.put_bytes(&bytes)?;
                        GenerateOutput {
                            shards_blob: id.to_hex(),
                            queries: shards.iter().map(|s| s.questions.len()).sum(),
                            set_aside,
                            llm: llm.clone(),
                        }
                    }
                };
                let json = serde_json::to_string(&out).unwrap_or_default();
                db.stage_done(job, "generate", &json, Some(&gen_key))?;
                db.event(
                    job,
                    &format!(
                        "generate: {} questions ({} shards set aside)",
                        out.queries, out.set_aside
                    ),
                )?;
                out.load(ctx)?
            }
        })
    }

    /// Prepare (filter, split, mine) on the best embedding node.
    #[allow(clippy::too_many_arguments)]
    async fn prepare_stage(
        &self,
        job: &str,
        spec: &JobSpec,
        ingested: &IngestOutput,
        chunks: Vec<Chunk>,
        shards: &[ShardOutput],
        done: &HashMap<String, String>,
        cancel: &CancellationToken,
    ) -> Result<PrepareOutput, JobError> {
        let (ctx, db) = (&self.ctx, &self.ctx.db);
        Ok(match done.get("prepare") {
            Some(o) => serde_json::from_str(o).map_err(|e| JobError::stage("prepare", e))?,
            None => {
                db.stage_started(job, "prepare")?;
                let (out, ran_on, why) =
                    prepare::run_prepare(ctx, job, spec, ingested, chunks, shards, cancel).await?;
                db.stage_placed(job, "prepare", &ran_on, &why)?;
                db.stage_done(
                    job,
                    "prepare",
                    &serde_json::to_string(&out).unwrap_or_default(),
                    None,
                )?;
                db.event(
                    job,
                    &format!(
                        "prepare: {} training records, {} test queries",
                        out.train_records, out.test_queries
                    ),
                )?;
                out
            }
        })
    }

    /// Evaluate base vs fine-tuned (`models.0`: the fine-tuned embedder, when the job trained
    /// one; `models.1`: the embedder that ranks the reranker's candidates) on the held-out set.
    async fn evaluate_stage(
        &self,
        job: &str,
        spec: &JobSpec,
        prepared: &PrepareOutput,
        models: (Option<&Path>, &Path),
        reranker_dir: Option<&Path>,
        done: &HashMap<String, String>,
    ) -> Result<EvalOutput, JobError> {
        let (ctx, db) = (&self.ctx, &self.ctx.db);
        let (tuned, model_dir) = models;
        Ok(match done.get("evaluate") {
            Some(o) => serde_json::from_str(o).map_err(|e| JobError::stage("evaluate", e))?,
            None => {
                db.stage_started(job, "evaluate")?;
                db.stage_placed(
                    job,
                    "evaluate",
                    "coordinator",
                    "the held-out set is on the coordinator",
                )?;
                let test = blob(&prepared.test_bundle, "prepare")?;
                let mut out = match tuned {
                    Some(dir) => local::evaluate(ctx, job, spec, dir, &test).await?,
                    None => EvalOutput::default(),
                };
                out.held_out_all_ict = prepared.held_out_all_ict();
                if let Some(dir) = reranker_dir {
                    out.rerank =
                        rerank::evaluate_reranking(ctx, job, spec, model_dir, dir, &test).await?;
                }
                db.stage_done(
                    job,
                    "evaluate",
                    &serde_json::to_string(&out).unwrap_or_default(),
                    None,
                )?;
                out
            }
        })
    }

    /// Export the fine-tuned models and register them.
    fn export_stage(
        &self,
        job: &str,
        spec: &JobSpec,
        trained: Option<&TrainOutput>,
        reranker: Option<&TrainOutput>,
        evaluated: &EvalOutput,
    ) -> Result<(), JobError> {
        let (ctx, db) = (&self.ctx, &self.ctx.db);
        db.stage_started(job, "export")?;
        let dest = spec
            .out
            .clone()
            .unwrap_or_else(|| ctx.state_dir.join("models").join(job));
        let mut paths = json!({});
        if let Some(t) = trained {
            let model = blob(&t.model, "train")?;
            export::export_bundle(&ctx.blobs, &model, &dest, job, "embedder", spec.force)?;
            let summary = json!({"base": evaluated.base, "tuned": evaluated.tuned,
                "comparison": evaluated.comparison, "questions": evaluated.questions,
                "held_out_comparison": evaluated.held_out_comparison,
                "held_out_all_ict": evaluated.held_out_all_ict});
            db.add_model(
                job,
                "embedder",
                &dest.display().to_string(),
                &summary.to_string(),
            )?;
            db.event(job, &format!("export: model written to {}", dest.display()))?;
            paths["path"] = json!(dest);
        }
        if let Some(r) = reranker {
            let rdest = rerank::reranker_dest(&dest);
            let model = blob(&r.model, "train_reranker")?;
            export::export_bundle(&ctx.blobs, &model, &rdest, job, "reranker", spec.force)?;
            let summary = json!({"rerank": evaluated.rerank});
            let id = format!("{job}-reranker");
            db.add_model(
                &id,
                "reranker",
                &rdest.display().to_string(),
                &summary.to_string(),
            )?;
            db.event(
                job,
                &format!("export: reranker written to {}", rdest.display()),
            )?;
            paths["reranker_path"] = json!(rdest);
        }
        db.stage_done(job, "export", &paths.to_string(), None)?;
        Ok(())
    }

    /// Runs one training stage (or reads its recorded output when it finished before a restart).
    async fn train_stage(
        &self,
        job: &str,
        spec: &JobSpec,
        kind: TrainKind,
        inputs: impl FnOnce() -> Result<TrainInputs, JobError>,
        done: &HashMap<String, String>,
        cancel: &CancellationToken,
    ) -> Result<TrainOutput, JobError> {
        let (ctx, stage) = (&self.ctx, kind.stage());
        if let Some(o) = done.get(stage) {
            return serde_json::from_str(o).map_err(|e| JobError::stage(stage, e));
        }
        ctx.db.stage_started(job, stage)?;
        let out = train::run_training(ctx, job, spec, &inputs()?, cancel).await?;
        ctx.db.stage_done(
            job,
            stage,
            &serde_json::to_string(&out).unwrap_or_default(),
            None,
        )?;
        ctx.db.event(
            job,
            &format!(
                "{stage}: {} steps on {} ({}), {:.1} pairs/s",
                out.steps, out.worker, out.device, out.pairs_per_sec
            ),
        )?;
        Ok(out)
    }
}

/// Tells workers to stop the task attempts the previous coordinator process had leased (their
/// tasks were put back and run under a new attempt); tries for two minutes as workers reconnect.
async fn cancel_stale_attempts(
    ctx: JobCtx,
    mut stale: Vec<(String, u32, String)>,
    cancel: CancellationToken,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !stale.is_empty() && std::time::Instant::now() < deadline {
        let mut left = Vec::new();
        for (task_id, attempt, worker) in stale {
            let task = ragd_shared::protocol::jobs::TaskRef { task_id, attempt };
            match ctx.supervisor.connection(&worker) {
                Some(conn) if super::remote::cancel(&conn, &task).await.is_ok() => {
                    tracing::info!(%task, %worker, "stopped an attempt left over from before the restart");
                }
                _ => left.push((task.task_id, task.attempt, worker)),
            }
        }
        stale = left;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

/// What the generate stage records: the shards blob and counts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct GenerateOutput {
    shards_blob: String,
    queries: usize,
    set_aside: usize,
    llm: String,
}

impl GenerateOutput {
    fn load(&self, ctx: &JobCtx) -> Result<Vec<ShardOutput>, JobError> {
        let bytes = ctx.blobs.read(&blob(&self.shards_blob, "generate")?)?;
        serde_json::from_slice(&bytes).map_err(|e| JobError::stage("generate", e))
    }
}
