//! Embedding shards: a cluster job's prepare step embeds its texts (corpus, questions, ICT
//! positives) as shards over every worker, then hands the vectors to the node that filters and
//! mines. The base model is loaded once per job and device and kept for the job's next shards.

use super::{ProgressCell, TaskEnv, TaskError};
use ragd_engine::data::embed::{embed_all, EmbedError, ModelEmbedder};
use ragd_engine::data::prepare_job::with_progress;
use ragd_engine::embed::SentenceEncoder;
use ragd_shared::protocol::jobs::{
    BlobId, EmbedSpec, TaskOutput, MAX_EMBED_SHARD_BYTES, MAX_EMBED_SHARD_TEXTS,
};
use std::sync::{Arc, Mutex};

/// The most vector bytes one answer carries (the frame limit is 16 MiB).
const MAX_EMBED_ANSWER_BYTES: usize = 12 << 20;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The base model of the embedding shards last run here: (model, device preference), the
/// device's description and the loaded model. It stays loaded until a task of another kind
/// starts ([`super::TaskRunner`]) or shards of another model come: a worker that embedded a
/// job's shards and then takes nothing else keeps it until its next task.
pub type EncoderCache = Arc<Mutex<Option<(BlobId, String, String, Arc<ModelEmbedder>)>>>;

/// Loads the base model `model` for `device` (or takes it from the cache).
pub(super) async fn encoder(
    env: &TaskEnv,
    model: BlobId,
    device: &str,
) -> Result<(Arc<ModelEmbedder>, String), TaskError> {
    {
        let cached = env.encoders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, pref, name, e)) = cached.as_ref() {
            if *id == model && pref == device {
                return Ok((e.clone(), name.clone()));
            }
        }
    }
    let (dev, device_name) = super::select_device(device)?;
    let (store, work) = (env.blobs.clone(), env.work_dir.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        let dir = super::train::materialize(&store, &work, &model)?;
        // Not the shard's fault (memory, a device): another worker may load it.
        let encoder = SentenceEncoder::load_dir(&dir, &dev)
            .map_err(|e| TaskError::failed(format!("the base model cannot be loaded here: {e}")))?;
        Ok::<_, TaskError>(Arc::new(ModelEmbedder::new(
            encoder,
            32,
            dir.display().to_string(),
        )))
    })
    .await
    .map_err(TaskError::failed)??;
    *env.encoders.lock().unwrap_or_else(|p| p.into_inner()) = Some((
        model,
        device.to_string(),
        device_name.clone(),
        loaded.clone(),
    ));
    Ok((loaded, device_name))
}

/// Runs an embedding shard: the vectors of `spec.texts` in their order, L2-normalised.
pub(super) async fn run(
    env: &TaskEnv,
    spec: EmbedSpec,
    progress: ProgressCell,
    cancel: CancellationToken,
) -> Result<TaskOutput, TaskError> {
    let bytes: usize = spec.texts.iter().map(String::len).sum();
    if spec.texts.len() > MAX_EMBED_SHARD_TEXTS || bytes > MAX_EMBED_SHARD_BYTES {
        return Err(TaskError::invalid(format!(
            "an embedding shard of {} texts and {bytes} bytes: at most {MAX_EMBED_SHARD_TEXTS} \
             texts and {MAX_EMBED_SHARD_BYTES} bytes are taken",
            spec.texts.len()
        )));
    }
    let (embedder, device) = encoder(env, spec.base_model, &spec.device).await?;
    progress.update(|p| {
        p.device = device.clone();
        p.total = spec.texts.len() as u64;
    });
    let started = Instant::now();
    let n = spec.texts.len();
    let batch = spec.batch_size.max(1) as usize;
    let matrix = with_progress(
        |p| progress.update(|s| s.done = p.done),
        |tx| async move {
            tokio::task::spawn_blocking(move || {
                embed_all(
                    embedder.as_ref(),
                    &spec.texts,
                    batch,
                    "embed",
                    Some(&tx),
                    &cancel,
                )
            })
            .await
        },
    )
    .await
    .map_err(TaskError::failed)?
    .map_err(|e| match e {
        EmbedError::Cancelled => TaskError::failed("cancelled"),
        other => TaskError::failed(other),
    })?;
    if matrix.as_slice().len() * 4 > MAX_EMBED_ANSWER_BYTES {
        return Err(TaskError::invalid(format!(
            "{n} vectors of {} dimensions do not fit in one answer: use a smaller --shard-size",
            matrix.dim()
        )));
    }
    Ok(TaskOutput::Embedded {
        dim: matrix.dim() as u32,
        vectors: matrix.as_slice().to_vec(),
        device,
        texts_per_sec: n as f64 / started.elapsed().as_secs_f64().max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capabilities::LlmProbeConfig;
    use ragd_engine::embed::tiny::{sample_texts, write_tiny_model, TinySpec};
    use ragd_shared::blobs::BlobStore;
    use ragd_shared::protocol::jobs::{TaskProgress, TaskState};

    fn cell() -> ProgressCell {
        ProgressCell(Arc::new(Mutex::new(TaskState::Running(
            TaskProgress::default(),
        ))))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shard_comes_back_as_unit_vectors_in_order_and_an_oversized_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let texts = sample_texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let model_dir = tmp.path().join("model");
        write_tiny_model(&model_dir, &refs, &TinySpec::default()).unwrap();
        let blobs = BlobStore::open(&tmp.path().join("blobs")).unwrap();
        let model = blobs.put_dir(&model_dir).unwrap();
        let env = TaskEnv::new(blobs, tmp.path().join("work"), LlmProbeConfig::disabled());
        let spec = |texts: Vec<String>| EmbedSpec {
            base_model: model,
            texts,
            batch_size: 3,
            device: "cpu".into(),
        };
        let shard: Vec<String> = texts[..7].to_vec();
        let out = run(&env, spec(shard.clone()), cell(), CancellationToken::new())
            .await
            .unwrap();
        let TaskOutput::Embedded { dim, vectors, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!((dim, vectors.len()), (32, 7 * 32));
        let rows: Vec<&[f32]> = vectors.chunks_exact(32).collect();
        for r in &rows {
            let norm: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        }
        // Order kept: the same text alone gives the same row.
        let one = run(
            &env,
            spec(vec![shard[4].clone()]),
            cell(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let TaskOutput::Embedded { vectors: alone, .. } = one else {
            panic!()
        };
        let diff = alone
            .iter()
            .zip(rows[4])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 1e-4,
            "row 4 differs from the text embedded alone by {diff}"
        );
        assert!(
            env.encoders.lock().unwrap().is_some(),
            "the model stays loaded for the next shard"
        );

        let huge = vec!["x".to_string(); MAX_EMBED_SHARD_TEXTS + 1];
        let err = run(&env, spec(huge), cell(), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, TaskError::Invalid { .. }), "{err}");
    }
}
