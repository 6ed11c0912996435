//! The `openai` backend against a real OpenAI-compatible server: llama-cpp-python's
//! `llama_cpp.server` serving SmolLM2-135M-Instruct on 127.0.0.1 (a fresh port). It refuses
//! `response_format` `json_schema` with HTTP 500, so the backend must fall back to `json_object`
//! with a `schema` and remember that for the endpoint.
//!
//! Needs the server's Python ($RAGD_LLAMA_CPP_PYTHON, else models/llama-cpp-server/bin/python
//! under the repo root; `scripts/fetch-models.sh llama-cpp-server` installs it) and the SmolLM2
//! GGUF ($RAGD_SMOLLM2_GGUF, else models/smollm2-135m-instruct/; `scripts/fetch-models.sh
//! smollm2`). When either is absent the test fails with the command that provides it.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ragd_engine::data::chunk::Chunk;
use ragd_engine::data::llm::builtin::arch::Architecture;
use ragd_engine::data::llm::builtin::tiny_gguf::write_tiny_gguf;
use ragd_engine::data::llm::builtin::tokenizer_from_gguf_file;
use ragd_engine::data::llm::generate::{
    questions_schema, GenerateConfig, LlmGenerator, PromptTemplate, QueryGenerator,
};
use ragd_engine::data::llm::openai::{OpenAiBackend, OpenAiConfig, StructuredMode};
use ragd_engine::data::llm::{ChatRequest, LlmBackend, LlmError, RequestPolicy, RetryPolicy};
use tokio_util::sync::CancellationToken;

fn repo_path(env: &str, relative: &str, fetch: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(relative)
    });
    assert!(
        path.is_file(),
        "{} not found: from the repo root run `scripts/fetch-models.sh {fetch}`, or set {env}",
        path.display()
    );
    path
}

/// The server process; killed when dropped, so a failing test leaves nothing running.
struct Server {
    child: Child,
    url: String,
    model: String,
    log: tempfile::NamedTempFile,
}

impl Server {
    /// Why a request failed, from the server's side: its exit status (a crash shows here, e.g.
    /// a llama.cpp built for instructions this CPU does not run) and its log.
    fn post_mortem(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("the server exited with {status}"),
            Ok(None) => "the server is still running".to_string(),
            Err(e) => format!("cannot read the server's status: {e}"),
        };
        let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let tail: String = log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        format!("{status}; last lines of its log:\n{tail}")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_server() -> Server {
    let python = repo_path(
        "RAGD_LLAMA_CPP_PYTHON",
        "models/llama-cpp-server/bin/python",
        "llama-cpp-server",
    );
    let gguf = repo_path(
        "RAGD_SMOLLM2_GGUF",
        "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2",
    );
    let port = free_loopback_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(&python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(&gguf)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--n_ctx", "2048", "--n_threads", "2", "--verbose", "false"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
    let mut server = Server {
        child,
        url: format!("http://127.0.0.1:{port}/v1"),
        model: gguf.to_string_lossy().into_owned(),
        log,
    };
    // Bounded wait for the model list: loading a 98 MB model takes seconds.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client.get(format!("{}/models", server.url)).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!(
                "llama_cpp.server exited with {status} before answering:\n{}",
                std::fs::read_to_string(server.log.path()).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "llama_cpp.server did not answer /v1/models within 120 s:\n{}",
            std::fs::read_to_string(server.log.path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    server
}

fn config(server: &Server, model: Option<&str>, stream: bool) -> OpenAiConfig {
    let mut c = OpenAiConfig::new(server.url.clone());
    c.api_key = None;
    c.model = model.map(str::to_string);
    c.stream = stream;
    c.policy = RequestPolicy {
        concurrency: 1,
        timeout: Duration::from_secs(120),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
        },
    };
    c
}

const PASSAGE: &str = "VACUUM reclaims storage occupied by dead tuples. In normal PostgreSQL operation, tuples that are deleted or obsoleted by an update are not physically removed from their table; they remain present until a VACUUM is done.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_llama_cpp_server_writes_schema_shaped_answers() {
    let mut server = start_server().await;

    // /v1/models: the backend picks the only model, and an unknown one is named as missing.
    let backend = OpenAiBackend::new(config(&server, None, false)).unwrap();
    backend.check().await.unwrap();
    assert_eq!(backend.info().model, server.model);
    let err = OpenAiBackend::new(config(&server, Some("no-such-model"), false))
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::ModelMissing { .. }), "{err}");

    // The real server refuses json_schema (HTTP 500); the backend falls back to json_object with
    // the schema, which llama.cpp turns into a grammar: the answer is JSON of the schema's shape.
    let request = ChatRequest {
        system: Some("You write questions.".into()),
        user: PromptTemplate::default().render(2, PASSAGE),
        schema: Some(questions_schema(2)),
        temperature: 0.2,
        seed: Some(7),
        max_tokens: 160,
    };
    for stream in [false, true] {
        let backend = OpenAiBackend::new(config(&server, None, stream)).unwrap();
        let reply = match backend.chat(&request).await {
            Ok(reply) => reply,
            Err(e) => panic!("stream={stream}: {e}; {}", server.post_mortem()),
        };
        assert_eq!(
            backend.structured_mode(),
            StructuredMode::JsonObject,
            "stream={stream}"
        );
        assert!(!reply.hit_token_limit, "stream={stream}: {:?}", reply.text);
        let value: serde_json::Value = serde_json::from_str(reply.text.trim())
            .unwrap_or_else(|e| panic!("stream={stream}: not JSON ({e}): {:?}", reply.text));
        assert!(
            value["questions"].is_array(),
            "stream={stream}: {:?}",
            reply.text
        );
        let stats = backend.stats();
        assert!(
            stats.completion_tokens > 0 && stats.tokens_per_second > 0.0,
            "stream={stream}: {stats:?}"
        );
    }

    // The generator end to end: retries, parsing and counting through the real server.
    let backend: Arc<dyn LlmBackend> =
        Arc::new(OpenAiBackend::new(config(&server, None, false)).unwrap());
    let generator = LlmGenerator::new(
        backend.clone(),
        PromptTemplate::default(),
        GenerateConfig {
            queries_per_chunk: 2,
            max_tokens: 160,
            ..Default::default()
        },
    )
    .unwrap();
    // A 135M model writes noisy answers (see ../shared/notes/data.md): several passages, so
    // that the check is that questions come through, not that every chunk gets one.
    let chunks: Vec<Chunk> = [
        PASSAGE,
        "The pg_dump utility writes a consistent snapshot of a database to a script or archive file, even while the database is in use. It does not block other users reading or writing the database.",
        "Logical replication publishes changes to tables as a stream of row-level operations. A subscription on another server pulls them and applies them to its own copies of the tables.",
    ]
    .iter()
    .enumerate()
    .map(|(i, text)| Chunk {
        id: format!("doc{i}_chunk_0"),
        document_id: format!("doc{i}"),
        text: text.to_string(),
    })
    .collect();
    let out = match generator
        .generate(&chunks, None, &CancellationToken::new())
        .await
    {
        Ok(out) => out,
        Err(e) => panic!("{e}; {}", server.post_mortem()),
    };
    eprintln!(
        "llama-cpp-python + SmolLM2-135M: {:?}, {:?}, {:.1} tokens/s",
        out.queries.iter().map(|q| &q.query).collect::<Vec<_>>(),
        out.counts,
        backend.stats().tokens_per_second
    );
    assert!(
        !out.queries.is_empty(),
        "no usable question from the real server for 3 passages: {:?}",
        out.counts
    );
    assert_eq!(
        out.counts.chunks_with_queries + out.counts.chunks_failed,
        3,
        "{:?}",
        out.counts
    );
    assert_eq!(
        out.counts.backend_errors,
        0,
        "{:?}; {}",
        out.counts,
        server.post_mortem()
    );
    for q in &out.queries {
        assert!(chunks.iter().any(|c| c.id == q.chunk_id), "{q:?}");
        assert!(q.query.ends_with('?'), "{q:?}");
    }
}

/// Token ids from llama.cpp's own tokenizer (through llama-cpp-python) for each (GGUF, texts).
fn llama_cpp_tokens(python: &Path, jobs: &[(PathBuf, Vec<String>)]) -> Vec<Vec<Vec<u32>>> {
    let script = r#"
import json, sys
from llama_cpp import Llama
out = []
for job in json.loads(sys.stdin.read()):
    llm = Llama(model_path=job["path"], vocab_only=True, verbose=False)
    out.append([llm.tokenize(t.encode(), add_bos=False, special=True) for t in job["texts"]])
print(json.dumps(out))
"#;
    let input: Vec<serde_json::Value> = jobs
        .iter()
        .map(|(path, texts)| serde_json::json!({"path": path, "texts": texts}))
        .collect();
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "llama-cpp-python tokenizer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The built-in generator's tokenizers, built from GGUF metadata, against llama.cpp's own
/// tokenizer reading the same files: SmolLM2's byte-level BPE on text with chat markers, digits,
/// punctuation, accents and whitespace runs; and the tiny files of every architecture the
/// built-in generator runs (byte-level BPE with the smollm / qwen2 pre-tokenizers, SentencePiece
/// with and without the space prefix, byte fallback).
#[test]
fn gguf_tokenizers_match_llama_cpp() {
    let python = repo_path(
        "RAGD_LLAMA_CPP_PYTHON",
        "models/llama-cpp-server/bin/python",
        "llama-cpp-server",
    );
    let smollm2 = repo_path(
        "RAGD_SMOLLM2_GGUF",
        "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2",
    );
    let mut jobs = vec![(
        smollm2,
        [
            "<|im_start|>user\nWhat does VACUUM FULL do in PostgreSQL 15.4?<|im_end|>\n<|im_start|>assistant\n",
            "Set max_wal_size = 2048MB; then run `pg_ctl reload`   (twice).",
            "Crème brûlée costs 12,50 € — naïve café\t\ttabs\n\n\nnewlines",
            "don't won't they'll I'm 1234567 x²",
        ]
        .map(String::from)
        .to_vec(),
    )];
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let path = dir.path().join(format!("tiny-{}.gguf", arch.gguf_name()));
        write_tiny_gguf(arch, &path, 1).unwrap();
        let marker = match arch {
            Architecture::Gemma3 => "<start_of_turn>",
            Architecture::Phi3 => "<|user|>",
            _ => "<|im_start|>",
        };
        let texts = vec![
            "the thin tin on the hill, héllo".to_string(),
            "  in  on\tthe 42 ünïcode ☃".to_string(),
            format!("{marker}the hint on the tin"),
        ];
        jobs.push((path, texts));
    }
    let expected = llama_cpp_tokens(&python, &jobs);
    for ((path, texts), want) in jobs.iter().zip(&expected) {
        let tokenizer = tokenizer_from_gguf_file(path).unwrap();
        for (text, want) in texts.iter().zip(want) {
            let got = tokenizer
                .encode(text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(&got, want, "{}: {text:?}", path.display());
            // Decoding gives the text back (after a control token, SentencePiece's space
            // prefix stays, as in llama.cpp: only the first one is dropped).
            if !text.contains('<') {
                assert_eq!(
                    tokenizer.decode(&got, false).unwrap(),
                    *text,
                    "{}",
                    path.display()
                );
            }
        }
    }
}
