//! The `openai` backend against the OpenAI-compatible stand-in in its three flavours.
use std::sync::atomic::Ordering;
use std::time::Duration;

use ragd_engine::data::llm::generate::{questions_schema, PromptTemplate};
use ragd_engine::data::llm::openai::{OpenAiBackend, OpenAiConfig, StructuredMode};
use ragd_engine::data::llm::parse::parse_questions;
use ragd_engine::data::llm::{ChatRequest, LlmBackend, LlmError, RequestPolicy, RetryPolicy};
use ragd_tests::standin::openai::{Flavour, OpenAiStandin};
use ragd_tests::standin::StandinConfig;

fn config(s: &OpenAiStandin, model: Option<&str>, stream: bool) -> OpenAiConfig {
    let mut c = OpenAiConfig::new(s.url());
    c.api_key = None;
    c.model = model.map(str::to_string);
    c.stream = stream;
    c.policy = RequestPolicy {
        concurrency: 2,
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        },
    };
    c
}

fn request() -> ChatRequest {
    ChatRequest {
        system: Some("You write questions.".into()),
        user: PromptTemplate::default().render(
            2,
            "Logical replication publishes table changes to subscribers.",
        ),
        schema: Some(questions_schema(2)),
        temperature: 0.2,
        seed: Some(5),
        max_tokens: 128,
    }
}

async fn standin(flavour: Flavour) -> OpenAiStandin {
    let config = StandinConfig {
        models: vec![
            "/models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            "other".into(),
        ],
        ..Default::default()
    };
    OpenAiStandin::start(config, flavour, None).await.unwrap()
}

#[tokio::test]
async fn models_endpoint_picks_or_checks_the_model() {
    let s = standin(Flavour::Full).await;
    let b = OpenAiBackend::new(config(&s, None, false)).unwrap();
    b.check().await.unwrap();
    assert_eq!(b.info().model, "/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let err = OpenAiBackend::new(config(&s, Some("gpt-9"), false))
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::ModelMissing { .. }));
    assert!(
        err.to_string().contains("other"),
        "the error lists what the server has: {err}"
    );
    // A chat naming an unknown model: 404, not retried.
    let err = OpenAiBackend::new(config(&s, Some("gpt-9"), false))
        .unwrap()
        .chat(&request())
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::ModelMissing { .. }), "{err}");
}

#[tokio::test]
async fn structured_output_falls_back_and_is_remembered() {
    for (flavour, mode, sent_first) in [
        (Flavour::Full, StructuredMode::JsonSchema, 1),
        (Flavour::LlamaCppPython, StructuredMode::JsonObject, 2),
        (Flavour::PlainOnly, StructuredMode::Prompt, 3),
    ] {
        let s = standin(flavour).await;
        let b = OpenAiBackend::new(config(&s, Some("other"), false)).unwrap();
        let reply = b.chat(&request()).await.unwrap();
        assert_eq!(
            parse_questions(&reply.text).questions.len(),
            2,
            "{flavour:?}: {}",
            reply.text
        );
        assert_eq!(b.structured_mode(), mode, "{flavour:?}");
        assert_eq!(s.state.seen.requests().len(), sent_first, "{flavour:?}");
        // The second request goes straight to the remembered mode.
        b.chat(&request()).await.unwrap();
        assert_eq!(s.state.seen.requests().len(), sent_first + 1, "{flavour:?}");
        let last = s.state.seen.requests().pop().unwrap();
        match mode {
            StructuredMode::JsonSchema => {
                assert_eq!(last["response_format"]["type"], "json_schema")
            }
            StructuredMode::JsonObject => {
                assert_eq!(last["response_format"]["type"], "json_object");
                assert_eq!(
                    last["response_format"]["schema"]["required"][0],
                    "questions"
                );
            }
            StructuredMode::Prompt => assert!(last.get("response_format").is_none()),
        }
        let usage = b.stats();
        assert!(usage.completion_tokens > 0 && usage.tokens_per_second > 0.0);
    }
}

#[tokio::test]
async fn streaming_busy_malformed_and_truncated() {
    let s = standin(Flavour::LlamaCppPython).await;
    for stream in [true, false] {
        let b = OpenAiBackend::new(config(&s, Some("other"), stream)).unwrap();
        let reply = b.chat(&request()).await.unwrap();
        assert_eq!(
            parse_questions(&reply.text).questions.len(),
            2,
            "{}",
            reply.text
        );
        s.state.faults.busy.store(1, Ordering::SeqCst);
        s.state.faults.malformed.store(1, Ordering::SeqCst);
        b.chat(&request()).await.unwrap();
        s.state.faults.truncated.store(1, Ordering::SeqCst);
        b.chat(&request()).await.unwrap();
        assert_eq!(b.stats().failed_attempts, 3, "stream={stream}");
    }
    s.state.faults.truncated.store(100, Ordering::SeqCst);
    let err = OpenAiBackend::new(config(&s, Some("other"), true))
        .unwrap()
        .chat(&request())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("[DONE]"), "{err}");
}

#[tokio::test]
async fn api_key_is_sent_as_bearer_token() {
    let s = OpenAiStandin::start(
        StandinConfig::default(),
        Flavour::Full,
        Some("sekrit".into()),
    )
    .await
    .unwrap();
    let mut c = config(&s, Some("standin:latest"), false);
    let err = OpenAiBackend::new(c.clone())
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::Http { status: 401, .. }), "{err}");
    c.api_key = Some("sekrit".into());
    let b = OpenAiBackend::new(c).unwrap();
    b.check().await.unwrap();
    b.chat(&request()).await.unwrap();
}
