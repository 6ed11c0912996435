//! The embedding shards of the prepare stage. Every text the prepare step embeds (the corpus,
//! the questions that pass the text filters, their ICT positives; `texts_to_embed`) is cut into
//! shards of similar lengths and embedded with the base model by every ready worker that speaks
//! protocol v4, one lane each ([`super::shards`]: leased, committed by (shard, attempt), resumed
//! after a restart). Each shard's vectors go into the blob store; the stage ends with an
//! embedding table (`ragd_engine::data::embed_table`) that the node running the search reads
//! instead of embedding again. Texts of shards set aside, or never run (no v4 worker ready after
//! a restart), are embedded by that node.

use super::drive::JobCtx;
use super::shards::{run_shards, ShardWork};
use super::{JobError, JobSpec};
use ragd_engine::data::embed_table::{shard_ranges, EmbeddingTable};
use ragd_shared::protocol::admin::WorkerRecord;
use ragd_shared::protocol::jobs::{
    BlobId, EmbedSpec, TaskOutput, TaskSpec, MAX_EMBED_SHARD_BYTES, MAX_EMBED_SHARD_TEXTS,
};
use ragd_shared::protocol::EMBED_TASK_VERSION;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Texts per embedding shard for each chunk of a generation shard (`--shard-size`, 8 by
/// default: 128 texts, a few seconds of work on a small CPU, so a lost worker costs little and
/// a fast one takes many).
pub const TEXTS_PER_SHARD_CHUNK: usize = 16;

/// The stage name of the shards in `jobs.db`.
const STAGE: &str = "embed";

/// A shard's payload: a range of the stage's text list, and that list's fingerprint (a restarted
/// coordinator that rebuilt another list sets the shard aside rather than mislabel vectors).
#[derive(Debug, Serialize, Deserialize)]
struct ShardPayload {
    start: usize,
    end: usize,
    texts: String,
}

/// What a committed shard holds.
#[derive(Debug, Serialize, Deserialize)]
struct ShardResult {
    /// The shard's embedding table, in the blob store.
    blob: String,
    dim: usize,
    rows: usize,
    device: String,
    texts_per_sec: f64,
}

/// The texts, their fingerprint, and the model that embeds them.
struct EmbedWork {
    texts: Arc<Vec<String>>,
    fingerprint: String,
    base_model: BlobId,
    batch_size: u32,
}

/// Whether `worker` can take embedding shards (it speaks protocol v4).
pub fn can_embed(ctx: &JobCtx, worker: &str) -> bool {
    ctx.worker_ready(worker)
        && ctx
            .registry
            .protocol_version(worker)
            .is_some_and(|v| v >= EMBED_TASK_VERSION)
}

/// Whether the embedding stage runs for `job`: some ready worker can embed, or an earlier run
/// of the stage (before a coordinator restart) committed shards, whose vectors are used even
/// when no worker can embed now (the prepare node embeds the rest).
pub fn embedding_runs(ctx: &JobCtx, job: &str) -> Result<bool, JobError> {
    let any_worker = ctx
        .registry
        .snapshot()
        .iter()
        .any(|w| can_embed(ctx, &w.id));
    Ok(any_worker || ctx.db.any_done(job, STAGE)?)
}

impl ShardWork for EmbedWork {
    fn stage(&self) -> &'static str {
        STAGE
    }

    fn lanes(&self, ctx: &JobCtx, w: &WorkerRecord) -> usize {
        // One lane: a shard already spreads its products over every core.
        usize::from(can_embed(ctx, &w.id))
    }

    fn takes_shards(&self, ctx: &JobCtx, worker: &str) -> bool {
        can_embed(ctx, worker)
    }

    fn waiting(&self) -> String {
        "embed: no ready worker can embed".into()
    }

    fn waits_for_workers(&self) -> bool {
        false
    }

    fn failures_in_a_row_allowed(&self) -> Option<u32> {
        Some(2)
    }

    async fn ready(&self, ctx: &JobCtx, worker: &str) -> Result<(), String> {
        let conn = ctx
            .supervisor
            .connection(worker)
            .ok_or_else(|| "not connected".to_string())?;
        super::remote::push_bundle(&conn, &ctx.blobs, &self.base_model)
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot send the base model: {e}"))
    }

    fn spec(&self, _ctx: &JobCtx, _worker: &str, payload: &str) -> Result<TaskSpec, String> {
        let p = self.payload(payload)?;
        Ok(TaskSpec::Embed(EmbedSpec {
            base_model: self.base_model,
            texts: self.texts[p.start..p.end].to_vec(),
            batch_size: self.batch_size,
            device: "auto".into(),
        }))
    }

    fn commit(&self, ctx: &JobCtx, payload: &str, output: TaskOutput) -> Result<String, String> {
        let p = self.payload(payload)?;
        let TaskOutput::Embedded {
            dim,
            vectors,
            device,
            texts_per_sec,
        } = output
        else {
            return Err(format!("unexpected output {output:?}"));
        };
        let (dim, rows) = (dim as usize, p.end - p.start);
        if dim == 0 || vectors.len() != rows * dim || vectors.iter().any(|x| !x.is_finite()) {
            return Err(format!(
                "the worker sent {} values for {rows} texts of width {dim}, or values that are not finite",
                vectors.len()
            ));
        }
        let mut table = EmbeddingTable::new(dim);
        for (text, row) in self.texts[p.start..p.end]
            .iter()
            .zip(vectors.chunks_exact(dim))
        {
            table.insert(text, row).map_err(|e| e.to_string())?;
        }
        let blob = ctx
            .blobs
            .put_bytes(&table.to_bytes())
            .map_err(|e| e.to_string())?;
        Ok(serde_json::to_string(&ShardResult {
            blob: blob.to_hex(),
            dim,
            rows,
            device,
            texts_per_sec,
        })
        .expect("shard result serialises"))
    }
}

impl EmbedWork {
    fn payload(&self, payload: &str) -> Result<ShardPayload, String> {
        let p: ShardPayload = serde_json::from_str(payload).map_err(|e| e.to_string())?;
        if p.texts != self.fingerprint || p.start >= p.end || p.end > self.texts.len() {
            return Err("the shard names texts of another list (were the inputs changed?)".into());
        }
        Ok(p)
    }
}

/// Embeds `texts` as shards over the workers that can; returns the embedding table's blob (for
/// the node that runs the search), or `None` when no shard was done (the prepare node then
/// embeds everything itself).
pub async fn run_embedding(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    texts: Vec<String>,
    base_model: BlobId,
    cancel: &CancellationToken,
) -> Result<Option<BlobId>, JobError> {
    let started = Instant::now();
    let shard_texts = (spec.shard_size * TEXTS_PER_SHARD_CHUNK).clamp(1, MAX_EMBED_SHARD_TEXTS);
    let batch_size = super::local::pipeline_config(spec).embed_batch.max(1) as u32;
    let (texts, fingerprint) = tokio::task::spawn_blocking(move || {
        let mut hasher = blake3::Hasher::new();
        for t in &texts {
            hasher.update(&(t.len() as u64).to_le_bytes());
            hasher.update(t.as_bytes());
        }
        (texts, hasher.finalize().to_hex().to_string())
    })
    .await
    .map_err(|e| JobError::stage("prepare", e))?;
    let payloads: Vec<String> = shard_ranges(&texts, shard_texts, MAX_EMBED_SHARD_BYTES)
        .into_iter()
        .map(|r| {
            serde_json::to_string(&ShardPayload {
                start: r.start,
                end: r.end,
                texts: fingerprint.clone(),
            })
            .expect("payload serialises")
        })
        .collect();
    let n = ctx.db.ensure_tasks(job, STAGE, &payloads)?;
    ctx.db.event(
        job,
        &format!(
            "embed: {} texts in {n} shards over the workers",
            texts.len()
        ),
    )?;
    let work = Arc::new(EmbedWork {
        texts: Arc::new(texts),
        fingerprint,
        base_model,
        batch_size,
    });
    let max_attempts = spec.max_attempts.max(1);
    run_shards(ctx, job, work.clone(), max_attempts, None, cancel).await?;

    let tasks = ctx.db.tasks(job, STAGE)?;
    let (blobs, work2) = (ctx.blobs.clone(), work.clone());
    let assembled = tokio::task::spawn_blocking(move || assemble(&work2, &blobs, &tasks))
        .await
        .map_err(|e| JobError::stage("prepare", e))??;
    let Assembled {
        table,
        done,
        by_worker,
        unusable,
    } = assembled;
    for (idx, why) in unusable {
        ctx.db.event(
            job,
            &format!("embed: shard {idx} unusable ({why}); the prepare node embeds it"),
        )?;
    }
    let Some((blob, rows)) = table else {
        ctx.db.event(
            job,
            "embed: no shard was embedded; the prepare node embeds every text",
        )?;
        return Ok(None);
    };
    ctx.db.event(
        job,
        &format!(
            "embed: {rows} of {} texts in {done} of {n} shards in {:.1} s ({})",
            work.texts.len(),
            started.elapsed().as_secs_f64(),
            by_worker
                .iter()
                .map(|(w, rows)| format!("{w} {rows}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )?;
    Ok(Some(blob))
}

/// The committed shards read back into one table.
struct Assembled {
    /// The table's blob and its row count (`None`: no shard was done).
    table: Option<(BlobId, usize)>,
    done: usize,
    by_worker: BTreeMap<String, usize>,
    /// Shards done but unreadable: (index, why).
    unusable: Vec<(i64, String)>,
}

/// Reads the vectors of every done shard into a table and stores it as a blob. Blocking (reads
/// and writes blobs).
fn assemble(
    work: &EmbedWork,
    blobs: &ragd_shared::blobs::BlobStore,
    tasks: &[super::db::TaskRow],
) -> Result<Assembled, JobError> {
    let mut out = Assembled {
        table: None,
        done: 0,
        by_worker: BTreeMap::new(),
        unusable: Vec::new(),
    };
    let mut table: Option<EmbeddingTable> = None;
    for t in tasks {
        let (Some(output), "done") = (&t.output, t.state.as_str()) else {
            continue;
        };
        let shard = (|| {
            let p = work.payload(&t.payload)?;
            let r: ShardResult = serde_json::from_str(output).map_err(|e| e.to_string())?;
            let id = BlobId::from_hex(&r.blob).ok_or("bad blob id")?;
            let bytes = blobs.read(&id).map_err(|e| e.to_string())?;
            let shard = EmbeddingTable::from_bytes(&bytes).map_err(|e| e.to_string())?;
            let width = table.as_ref().map_or(shard.dim(), EmbeddingTable::dim);
            if shard.len() != p.end - p.start || shard.dim() != width {
                return Err(format!(
                    "{} rows of width {} for {} texts (the table's width is {width})",
                    shard.len(),
                    shard.dim(),
                    p.end - p.start
                ));
            }
            Ok::<_, String>((r, shard))
        })();
        let (r, shard) = match shard {
            Ok(s) => s,
            Err(e) => {
                out.unusable.push((t.idx, e));
                continue;
            }
        };
        table
            .get_or_insert_with(|| EmbeddingTable::new(shard.dim()))
            .merge(&shard)
            .map_err(|e| JobError::stage("prepare", e))?;
        out.done += 1;
        *out.by_worker
            .entry(t.done_by.clone().unwrap_or_default())
            .or_default() += r.rows;
    }
    if let Some(table) = table {
        let bytes = table.to_bytes();
        let rows = table.len();
        drop(table);
        out.table = Some((blobs.put_bytes(&bytes)?, rows));
    }
    Ok(out)
}
