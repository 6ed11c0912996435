//! The built-in GGUF generator with the real SmolLM2-135M-Instruct. Needs the model file: it is
//! looked up at $RAGD_SMOLLM2_GGUF, else at models/smollm2-135m-instruct/ under the repo root;
//! when absent the test fails with the command that fetches it.
use std::path::PathBuf;
use std::sync::Arc;

use ragd_engine::data::chunk::Chunk;
use ragd_engine::data::llm::builtin::BuiltinBackend;
use ragd_engine::data::llm::generate::{
    GenerateConfig, LlmGenerator, PromptTemplate, QueryGenerator,
};
use ragd_engine::data::llm::{ChatRequest, LlmBackend};
use tokio_util::sync::CancellationToken;

fn gguf() -> PathBuf {
    let path = std::env::var_os("RAGD_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "SmolLM2 GGUF not found at {}: from the repo root run `bash ../shared/tools/fetch-smollm2.sh models/smollm2-135m-instruct`, or set RAGD_SMOLLM2_GGUF",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_writes_questions_in_process() {
    let path = gguf();
    let backend = tokio::task::spawn_blocking(move || BuiltinBackend::load(&path))
        .await
        .unwrap()
        .unwrap();
    let reply = backend
        .chat(&ChatRequest {
            system: Some("You are a helpful assistant.".into()),
            user: "What is the capital of France? Answer in one word.".into(),
            schema: None,
            temperature: 0.0,
            seed: Some(1),
            max_tokens: 8,
        })
        .await
        .unwrap();
    assert!(
        reply.text.to_lowercase().contains("paris"),
        "{:?}",
        reply.text
    );
    let backend: Arc<dyn LlmBackend> = Arc::new(backend);
    let g = LlmGenerator::new(
        backend.clone(),
        PromptTemplate::default(),
        GenerateConfig {
            queries_per_chunk: 2,
            max_tokens: 64,
            ..Default::default()
        },
    )
    .unwrap();
    let chunks: Vec<Chunk> = [
        "VACUUM reclaims storage occupied by dead tuples. In normal PostgreSQL operation, tuples that are deleted or obsoleted by an update are not physically removed from their table; they remain present until a VACUUM is done.",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| Chunk { id: format!("d_chunk_{i}"), document_id: "d".into(), text: t.to_string() })
    .collect();
    let out = g
        .generate(&chunks, None, &CancellationToken::new())
        .await
        .unwrap();
    let stats = backend.stats();
    eprintln!(
        "builtin SmolLM2-135M: {} queries from {} chunks, {:.1} tokens/s ({} tokens): {:?}",
        out.queries.len(),
        chunks.len(),
        stats.tokens_per_second,
        stats.completion_tokens,
        out.queries.iter().map(|q| &q.query).collect::<Vec<_>>()
    );
    assert!(
        !out.queries.is_empty(),
        "SmolLM2 gave no usable question in 3 attempts"
    );
    assert!(stats.tokens_per_second > 0.0);
}
