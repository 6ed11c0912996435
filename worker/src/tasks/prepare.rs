//! The prepare task: the embedding-heavy data step of a job (round-trip filter, split by
//! document, hard-negative mining) run with the base model on this worker, reading the vectors
//! the job's embedding shards made where it is given them (`PrepareEmbedded`).

use super::{ProgressCell, TaskEnv, TaskError};
use ragd_engine::data::chunk::Chunk;
use ragd_engine::data::embed::{Embedder, ModelEmbedder};
use ragd_engine::data::embed_table::{EmbeddingTable, TableEmbedder};
use ragd_engine::data::llm::generate::GeneratedQuery;
use ragd_engine::data::pipeline::{PipelineConfig, PipelineError};
use ragd_engine::data::prepare_job::{prepare_shards, ShardQueries};
use ragd_engine::embed::SentenceEncoder;
use ragd_shared::protocol::jobs::{BlobId, PrepareSpec, TaskOutput, TaskRef};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs a prepare task; `embeddings` is the table of the job's embedding shards, if any.
pub(super) async fn run(
    env: &TaskEnv,
    task: &TaskRef,
    spec: PrepareSpec,
    embeddings: Option<BlobId>,
    progress: ProgressCell,
    cancel: CancellationToken,
) -> Result<TaskOutput, TaskError> {
    let store = env.blobs.clone();
    let chunks: Vec<Chunk> = store
        .read(&spec.chunks)
        .map_err(|e| TaskError::invalid(format!("chunks: {e}")))?
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice::<Chunk>(l)
                .map_err(|e| TaskError::invalid(format!("chunks: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let queries: Vec<GeneratedQuery> = serde_json::from_slice(
        &store
            .read(&spec.questions)
            .map_err(|e| TaskError::invalid(format!("questions: {e}")))?,
    )
    .map_err(|e| TaskError::invalid(format!("questions: {e}")))?;
    let config = PipelineConfig::from(&spec.settings);
    let (dev, device_name) = super::select_device(&spec.device)?;
    let (store2, work, model_id) = (store.clone(), env.work_dir.clone(), spec.base_model);
    let model_dir =
        tokio::task::spawn_blocking(move || super::train::materialize(&store2, &work, &model_id))
            .await
            .map_err(TaskError::failed)??;
    let name = model_dir.display().to_string();
    let encoder = tokio::task::spawn_blocking(move || SentenceEncoder::load_dir(&model_dir, &dev))
        .await
        .map_err(TaskError::failed)?
        .map_err(|e| TaskError::invalid(e.to_string()))?;
    let model: Arc<dyn Embedder> = Arc::new(ModelEmbedder::new(encoder, 32, name.clone()));
    let embedder: Arc<dyn Embedder> = match embeddings {
        None => model,
        Some(id) => {
            let store = store.clone();
            let table = tokio::task::spawn_blocking(move || {
                let bytes = store
                    .read(&id)
                    .map_err(|e| TaskError::invalid(format!("embedding table: {e}")))?;
                EmbeddingTable::from_bytes(&bytes).map_err(|e| TaskError::invalid(e.to_string()))
            })
            .await
            .map_err(TaskError::failed)??;
            // Texts of shards that were set aside are embedded here, with the model.
            Arc::new(TableEmbedder::new(Arc::new(table), Some(model), name))
        }
    };
    progress.update(|p| p.device = device_name.clone());
    let out = env
        .work_dir
        .join("runs")
        .join(format!("{}-{}", task.task_id, task.attempt));
    let shards = ShardQueries {
        chunks,
        queries,
        generator: spec.generator.clone(),
        tokens_per_second: spec.tokens_per_second,
    };
    let manifest = prepare_shards(
        shards,
        embedder,
        &out,
        &config,
        |p| {
            progress.update(|s| {
                s.done = p.done;
                s.total = p.total;
            })
        },
        cancel,
    )
    .await
    .map_err(|e| match e {
        PipelineError::Empty { .. } => TaskError::invalid(e.to_string()),
        other => TaskError::failed(other),
    })?;
    let (train, test) = tokio::task::spawn_blocking(move || {
        let (train, _) = store.put_file(&out.join("train.jsonl"))?;
        let test = store.put_dir(&out.join("test"))?;
        Ok::<_, ragd_shared::blobs::BlobError>((train, test))
    })
    .await
    .map_err(TaskError::failed)?
    .map_err(TaskError::failed)?;
    Ok(TaskOutput::Prepared {
        train,
        test,
        manifest_json: serde_json::to_string(&manifest).unwrap_or_default(),
    })
}
