//! The prepare task: the embedding-heavy data step of a job (round-trip filter, split by chunk,
//! hard-negative mining) run with the base model on this worker.

use super::{ProgressCell, TaskEnv, TaskError};
use crate::data::chunk::Chunk;
use crate::data::embed::ModelEmbedder;
use crate::data::llm::generate::{GeneratedQuery, QuerySource};
use crate::data::pipeline::{self, GeneratorSummary, PipelineConfig};
use crate::embed::SentenceEncoder;
use ragd_shared::protocol::jobs::{ChunkText, GeneratedQuestion, PrepareSpec, TaskOutput, TaskRef};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Runs a prepare task.
pub(super) async fn run(
    env: &TaskEnv,
    task: &TaskRef,
    spec: PrepareSpec,
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
            serde_json::from_slice::<ChunkText>(l)
                .map(|c| Chunk {
                    id: c.id,
                    document_id: c.document_id,
                    text: c.text,
                })
                .map_err(|e| TaskError::invalid(format!("chunks: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let questions: Vec<GeneratedQuestion> = serde_json::from_slice(
        &store
            .read(&spec.questions)
            .map_err(|e| TaskError::invalid(format!("questions: {e}")))?,
    )
    .map_err(|e| TaskError::invalid(format!("questions: {e}")))?;
    let generated: Vec<GeneratedQuery> = questions
        .into_iter()
        .map(|q| GeneratedQuery {
            source: if q.positive_text.is_some() {
                QuerySource::Ict
            } else {
                QuerySource::Llm
            },
            query: q.query,
            chunk_id: q.chunk_id,
            positive_text: q.positive_text,
        })
        .collect();
    let config: PipelineConfig = serde_json::from_str(&spec.config_json)
        .map_err(|e| TaskError::invalid(format!("pipeline settings: {e}")))?;
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
    progress.update(|p| p.device = device_name.clone());
    let (kind, model) = spec
        .generator
        .split_once(' ')
        .unwrap_or((spec.generator.as_str(), ""));
    let summary = GeneratorSummary {
        kind: kind.to_string(),
        model: model.to_string(),
        endpoint: None,
        prompt_hash: None,
        tokens_per_second: spec.tokens_per_second,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::data::Progress>();
    let watcher = {
        let progress = progress.clone();
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                progress.update(|s| {
                    s.done = p.done;
                    s.total = p.total;
                });
            }
        })
    };
    let out = env
        .work_dir
        .join("runs")
        .join(format!("{}-{}", task.task_id, task.attempt));
    let manifest = pipeline::finish_step(
        Arc::new(chunks),
        generated,
        &out,
        &config,
        Arc::new(ModelEmbedder::new(encoder, 32, name)),
        None,
        summary,
        Some(tx),
        cancel,
        Vec::new(),
        Instant::now(),
    )
    .await;
    watcher.abort();
    let manifest = manifest.map_err(|e| match e {
        pipeline::PipelineError::Empty { .. } => TaskError::invalid(e.to_string()),
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
