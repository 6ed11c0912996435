//! The `ollama` backend against the protocol-faithful Ollama stand-in.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ragd_engine::data::chunk::Chunk;
use ragd_engine::data::llm::generate::{
    questions_schema, GenerateConfig, LlmGenerator, PromptTemplate, QueryGenerator,
};
use ragd_engine::data::llm::ollama::{OllamaBackend, OllamaConfig, OllamaEndpoint};
use ragd_engine::data::llm::parse::parse_questions;
use ragd_engine::data::llm::{ChatRequest, LlmBackend, LlmError, RequestPolicy, RetryPolicy};
use ragd_tests::standin::ollama::OllamaStandin;
use ragd_tests::standin::StandinConfig;
use tokio_util::sync::CancellationToken;

fn fast_policy(concurrency: usize) -> RequestPolicy {
    RequestPolicy {
        concurrency,
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        },
    }
}

fn backend(
    standin: &OllamaStandin,
    model: &str,
    stream: bool,
    concurrency: usize,
) -> OllamaBackend {
    let mut c = OllamaConfig::new(model);
    c.base_url = standin.url();
    c.stream = stream;
    c.policy = fast_policy(concurrency);
    OllamaBackend::new(c).expect("loopback stand-in URL is accepted")
}

fn request() -> ChatRequest {
    ChatRequest {
        system: Some("You write questions.".into()),
        user: PromptTemplate::default().render(
            3,
            "Checkpoints flush dirty buffers to durable storage periodically.",
        ),
        schema: Some(questions_schema(3)),
        temperature: 0.2,
        seed: Some(11),
        max_tokens: 128,
    }
}

fn chunks(n: usize) -> Vec<Chunk> {
    (0..n)
        .map(|i| Chunk {
            id: format!("doc{i}.md_chunk_0"),
            document_id: format!("doc{i}.md"),
            text: format!("Section {i}: replication slots retain write-ahead segments until every standby confirms receipt number {i}."),
        })
        .collect()
}

#[tokio::test]
async fn check_finds_the_model_and_names_ollama_pull_when_missing() {
    let s = OllamaStandin::start(StandinConfig::default())
        .await
        .unwrap();
    backend(&s, "standin", false, 1)
        .check()
        .await
        .expect("`standin` matches standin:latest");
    let err = backend(&s, "llama3.2:3b", false, 1)
        .check()
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::ModelMissing { .. }), "{err}");
    assert!(err.to_string().contains("ollama pull llama3.2:3b"), "{err}");
    // Chat with an unknown model: 404, not retried.
    let err = backend(&s, "nope", true, 1)
        .chat(&request())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ollama pull nope"), "{err}");
    assert_eq!(s.state.seen.requests().len(), 1);
}

#[tokio::test]
async fn streaming_and_non_streaming_replies_with_schema_and_counts() {
    let s = OllamaStandin::start(StandinConfig::default())
        .await
        .unwrap();
    for stream in [false, true] {
        let b = backend(&s, "standin:latest", stream, 1);
        let reply = b.chat(&request()).await.unwrap();
        let parsed = parse_questions(&reply.text);
        assert!(parsed.was_json, "{}", reply.text);
        assert_eq!(parsed.questions.len(), 3, "{}", reply.text);
        assert!(reply.completion_tokens.unwrap() > 0);
        assert!(reply.generation_time.unwrap() > Duration::ZERO);
        assert!(b.stats().tokens_per_second > 0.0);
    }
    let seen = s.state.seen.requests();
    assert_eq!(seen[0]["stream"], false);
    assert_eq!(seen[1]["stream"], true);
    assert_eq!(seen[1]["format"]["properties"]["questions"]["maxItems"], 3);
    assert_eq!(seen[1]["options"]["seed"], 11);
    assert_eq!(seen[1]["options"]["num_predict"], 128);
    assert_eq!(seen[1]["keep_alive"], "5m");
    assert_eq!(seen[1]["messages"][0]["role"], "system");
}

#[tokio::test]
async fn generate_endpoint_works_too() {
    let s = OllamaStandin::start(StandinConfig::default())
        .await
        .unwrap();
    let mut c = OllamaConfig::new("standin");
    c.base_url = s.url();
    c.endpoint = OllamaEndpoint::Generate;
    c.policy = fast_policy(1);
    let b = OllamaBackend::new(c).unwrap();
    let reply = b.chat(&request()).await.unwrap();
    assert_eq!(parse_questions(&reply.text).questions.len(), 3);
    let seen = s.state.seen.requests();
    assert!(seen[0]["prompt"].as_str().unwrap().contains("Checkpoints"));
    assert_eq!(seen[0]["system"], "You write questions.");
}

#[tokio::test]
async fn busy_malformed_and_truncated_replies_are_retried() {
    let s = OllamaStandin::start(StandinConfig::default())
        .await
        .unwrap();
    for stream in [false, true] {
        s.state.faults.busy.store(2, Ordering::SeqCst);
        s.state.faults.malformed.store(1, Ordering::SeqCst);
        let b = backend(&s, "standin", stream, 1);
        let before = s.state.seen.requests().len();
        let reply = b.chat(&request()).await.unwrap();
        assert_eq!(parse_questions(&reply.text).questions.len(), 3);
        assert_eq!(
            s.state.seen.requests().len() - before,
            4,
            "2 busy + 1 malformed + 1 good"
        );
        s.state.faults.truncated.store(1, Ordering::SeqCst);
        b.chat(&request()).await.unwrap();
        assert_eq!(b.stats().failed_attempts, 4);
    }
    // Faults that never end exhaust the retries.
    s.state.faults.truncated.store(100, Ordering::SeqCst);
    let err = backend(&s, "standin", true, 1)
        .chat(&request())
        .await
        .unwrap_err();
    assert!(
        matches!(err, LlmError::RetriesExhausted { attempts: 4, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn queue_full_gives_503_that_backs_off_and_concurrency_is_bounded() {
    let config = StandinConfig {
        latency: Duration::from_millis(40),
        max_parallel: 1,
        max_queue: 1,
        ..Default::default()
    };
    let s = OllamaStandin::start(config).await.unwrap();
    let mut c = OllamaConfig::new("standin");
    c.base_url = s.url();
    c.policy = RequestPolicy {
        concurrency: 4,
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        },
    };
    let b: Arc<dyn LlmBackend> = Arc::new(OllamaBackend::new(c).unwrap());
    let g = LlmGenerator::new(
        b,
        PromptTemplate::default(),
        GenerateConfig {
            concurrency: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let out = g
        .generate(&chunks(6), None, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.counts.chunks_with_queries, 6);
    assert!(
        s.state.seen.rejected_busy.load(Ordering::SeqCst) > 0,
        "4 at once against room for 2 must see 503"
    );
    assert_eq!(s.state.seen.peak_in_flight.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn generator_retries_unusable_answers_then_counts_failures() {
    let s = OllamaStandin::start(StandinConfig::default())
        .await
        .unwrap();
    let b: Arc<dyn LlmBackend> = Arc::new(backend(&s, "standin", true, 2));
    let g = LlmGenerator::new(b, PromptTemplate::default(), GenerateConfig::default()).unwrap();
    s.state.faults.garbage.store(1, Ordering::SeqCst);
    let out = g
        .generate(&chunks(3), None, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.counts.chunks_with_queries, 3);
    assert_eq!(out.counts.unusable_answers, 1);
    assert_eq!(out.queries.len(), 6);
    assert_eq!(out.queries[0].chunk_id, "doc0.md_chunk_0");
    assert!(out.queries.iter().all(|q| q.query.ends_with('?')));
    // Every answer garbage: each chunk fails after 3 attempts, and the run stops at the limit.
    s.state.faults.garbage.store(1000, Ordering::SeqCst);
    let out = g
        .generate(&chunks(2), None, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out.counts.chunks_failed, 2);
    assert_eq!(out.counts.unusable_answers, 6);
    let b: Arc<dyn LlmBackend> = Arc::new(backend(&s, "standin", true, 2));
    let strict = LlmGenerator::new(
        b,
        PromptTemplate::default(),
        GenerateConfig {
            max_consecutive_failures: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let err = strict
        .generate(&chunks(10), None, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("3 chunks in a row failed"),
        "{err}"
    );
}
