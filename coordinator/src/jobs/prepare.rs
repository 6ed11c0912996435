//! The prepare stage: the round-trip filter, the split and the hard-negative mining embed the
//! whole corpus and every question with the base model. The embedding runs first, as shards on
//! every worker that can take them ([`super::embed`]); the search and the rest of the step then
//! run on the worker that calibrates fastest for this model (a cached measurement the training
//! placement reuses), reading those vectors. Without any ready worker the coordinator runs the
//! step itself, still reading the vectors of shards committed before a restart.

use super::drive::{drive, DriveError, JobCtx};
use super::embed::{can_embed, embedding_runs, run_embedding};
use super::generate::ShardOutput;
use super::local::{self, IngestOutput, PrepareOutput};
use super::remote;
use super::train::calibrate;
use super::JobError;
use super::JobSpec;
use ragd_engine::data::output::Manifest;
use ragd_engine::data::prepare_job::texts_to_embed;
use ragd_shared::blobs::MAX_BLOB_LEN;
use ragd_shared::protocol::jobs::{
    BlobId, PrepareEmbeddedSpec, PrepareSpec, TaskOutput, TaskSpec, TaskStart,
};
use ragd_shared::protocol::settings::PrepareSettings;
use std::collections::HashSet;
use tokio_util::sync::CancellationToken;

/// The calibrated ready workers, fastest first: (worker, device, pairs/s). Workers not yet
/// measured for this model are calibrated at once, each on its own machine.
async fn ranked_workers(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    base_model: &BlobId,
    skip: &HashSet<String>,
    cancel: &CancellationToken,
) -> Result<Vec<(String, String, f64)>, JobError> {
    let mut ranked = Vec::new();
    let mut unmeasured = Vec::new();
    for w in ctx.registry.snapshot() {
        if skip.contains(&w.id) || !ctx.worker_ready(&w.id) {
            continue;
        }
        let Some(conn) = ctx.supervisor.connection(&w.id) else {
            continue;
        };
        match ctx.db.calibration(&w.id, &base_model.to_hex())? {
            Some((device, pps)) => ranked.push((w.id.clone(), device, pps)),
            None => unmeasured.push((w.id.clone(), conn)),
        }
    }
    let measured = futures::future::join_all(
        unmeasured
            .iter()
            .map(|(id, conn)| calibrate(ctx, job, spec, id, conn, base_model, cancel)),
    )
    .await;
    for ((id, _), m) in unmeasured.into_iter().zip(measured) {
        if let Some((device, pps)) = m? {
            ranked.push((id, device, pps));
        }
    }
    ranked.sort_by(|a, b| b.2.total_cmp(&a.2));
    Ok(ranked)
}

/// Runs the prepare stage; returns its output and where it ran (and why).
pub async fn run_prepare(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    ingested: &IngestOutput,
    chunks: Vec<ragd_shared::protocol::jobs::Chunk>,
    shards: &[ShardOutput],
    cancel: &CancellationToken,
) -> Result<(PrepareOutput, String, String), JobError> {
    let base = spec.base_model.clone();
    let blobs = ctx.blobs.clone();
    let base_model = tokio::task::spawn_blocking(move || blobs.put_dir(&base))
        .await
        .map_err(|e| JobError::stage("prepare", e))??;
    let inputs = local::shard_queries(chunks, shards);
    let questions_blob = ctx
        .blobs
        .put_bytes(&serde_json::to_vec(&inputs.queries).expect("questions serialise"))?;
    let chunks_blob = BlobId::from_hex(&ingested.chunks_blob)
        .ok_or_else(|| JobError::stage("prepare", "bad chunks blob id"))?;
    let config = local::pipeline_config(spec);
    let settings = PrepareSettings::from(&config);
    let embedded = if embedding_runs(ctx, job)? {
        let (chunks, queries) = (inputs.chunks.clone(), inputs.queries.clone());
        let texts = tokio::task::spawn_blocking(move || texts_to_embed(&chunks, &queries, &config))
            .await
            .map_err(|e| JobError::stage("prepare", e))?
            .map_err(|e| JobError::stage("prepare", e))?;
        run_embedding(ctx, job, spec, texts, base_model, cancel).await?
    } else {
        None
    };
    ctx.db.ensure_tasks(job, "prepare", &[String::from("{}")])?;
    let mut lost: HashSet<String> = HashSet::new();
    let ttl = ctx.lease_ttl.as_millis() as u64;
    loop {
        if cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        let mut ranked = ranked_workers(ctx, job, spec, &base_model, &lost, cancel).await?;
        // Only a v4 worker can be handed the vectors; a v2/v3 one embeds everything itself.
        let table = embedded.filter(|_| ranked.iter().any(|(w, ..)| can_embed(ctx, w)));
        if table.is_some() {
            ranked.retain(|(w, ..)| can_embed(ctx, w));
        }
        let Some((worker, device, pps)) = ranked.first().cloned() else {
            ctx.db.event(
                job,
                "prepare: no calibrated worker is ready; running it on the coordinator",
            )?;
            let out = local::prepare(ctx, job, spec, inputs, embedded, cancel).await?;
            return Ok((
                out,
                "coordinator".into(),
                "no ready worker could embed".into(),
            ));
        };
        let why = format!(
            "best embedding node: {}",
            ranked
                .iter()
                .map(|(w, d, p)| format!("{w} {p:.1} pairs/s ({d})"))
                .collect::<Vec<_>>()
                .join(" vs ")
        );
        ctx.db.stage_placed(job, "prepare", &worker, &why)?;
        let Some(conn) = ctx.supervisor.connection(&worker) else {
            lost.insert(worker);
            continue;
        };
        let pushed = async {
            let mut blobs = vec![chunks_blob, questions_blob];
            blobs.extend(table);
            remote::push_blobs(&conn, &ctx.blobs, &blobs).await?;
            remote::push_bundle(&conn, &ctx.blobs, &base_model).await
        };
        if let Err(e) = pushed.await {
            ctx.db.event(
                job,
                &format!("prepare: cannot send the inputs to {worker}: {e}"),
            )?;
            lost.insert(worker);
            continue;
        }
        let Some(task) = ctx.db.lease_next(job, "prepare", &worker, ttl).await? else {
            return Err(JobError::stage(
                "prepare",
                "the prepare task failed too often and was set aside; see `ragd-coord logs`",
            ));
        };
        let tref = task.task_ref();
        let prepare = PrepareSpec {
            chunks: chunks_blob,
            questions: questions_blob,
            base_model,
            settings,
            generator: inputs.generator.clone(),
            tokens_per_second: inputs.tokens_per_second,
            device: "auto".into(),
        };
        let start = TaskStart {
            task: tref.clone(),
            job_id: job.to_string(),
            spec: match table {
                Some(embeddings) => TaskSpec::PrepareEmbedded(PrepareEmbeddedSpec {
                    prepare,
                    embeddings,
                }),
                None => TaskSpec::Prepare(prepare),
            },
        };
        ctx.db.event(
            job,
            &format!("prepare: on {worker} ({device}, {pps:.1} pairs/s)"),
        )?;
        let max = spec.max_attempts.max(1);
        let (ctx2, job2, worker2) = (ctx.clone(), job.to_string(), worker.clone());
        let result = drive(ctx, &worker, start, Vec::new(), true, cancel, move |p| {
            ctx2.set_live(
                &job2,
                "prepare",
                format!("prepare on {worker2}: {}/{}", p.done, p.total),
            );
            async {}
        })
        .await;
        match result {
            Ok(TaskOutput::Prepared {
                train,
                test,
                manifest_json,
            }) => {
                remote::fetch_blob(&conn, &ctx.blobs, &train, MAX_BLOB_LEN).await?;
                remote::fetch_bundle(&conn, &ctx.blobs, &test).await?;
                let manifest: Manifest = serde_json::from_str(&manifest_json)
                    .map_err(|e| JobError::stage("prepare", e))?;
                let out = PrepareOutput {
                    train_blob: train.to_hex(),
                    test_bundle: test.to_hex(),
                    train_records: manifest.train_records,
                    test_queries: manifest.test_queries,
                    negatives: local::count_negatives_per_pair(&ctx.blobs.path(&train)),
                    steps: manifest.steps,
                };
                let json = serde_json::to_string(&out).unwrap_or_default();
                ctx.db
                    .commit_task(&task.id, task.attempts, &worker, &json, 0.0)
                    .await?;
                let _ = remote::forget(&conn, &tref).await;
                return Ok((out, worker, why));
            }
            Ok(other) => {
                return Err(JobError::stage(
                    "prepare",
                    format!("worker answered {other:?}"),
                ))
            }
            Err(DriveError::Cancelled) => {
                ctx.db
                    .release(&task.id, task.attempts, "cancelled", u32::MAX)
                    .await?;
                return Err(JobError::Cancelled);
            }
            Err(DriveError::Lost(why)) => {
                ctx.db
                    .release(&task.id, task.attempts, &why, max + 2)
                    .await?;
                ctx.db.event(
                    job,
                    &format!("prepare: {worker} lost ({why}); trying the next node"),
                )?;
                lost.insert(worker);
            }
            Err(DriveError::LeaseLost) => {}
            Err(DriveError::Failed { message, retryable }) => {
                ctx.db
                    .release(
                        &task.id,
                        task.attempts,
                        &message,
                        if retryable { max } else { 0 },
                    )
                    .await?;
                if !retryable {
                    return Err(JobError::stage("prepare", message));
                }
                ctx.db
                    .event(job, &format!("prepare on {worker} failed: {message}"))?;
            }
        }
    }
}
