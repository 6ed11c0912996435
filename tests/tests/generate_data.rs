//! `generate-data` end to end on a small hand-written corpus: ICT and the Ollama stand-in.
use std::path::Path;

use clap::Parser;
use ragd_engine::data::chunk::train_wordpiece;
use ragd_engine::data::output::{Manifest, TrainRecord};
use ragd_tests::standin::ollama::OllamaStandin;
use ragd_tests::standin::StandinConfig;
use ragd_worker::cli::data::{run_generate_data, GenerateDataArgs};

const TOPICS: &[&str] = &[
    "Checkpoints write every dirty buffer to disk. The checkpointer runs at intervals set by checkpoint_timeout. A crash replays the write-ahead log from the last checkpoint. Frequent checkpoints shorten recovery but add input and output load.",
    "Autovacuum launches worker processes that vacuum tables. Each worker removes dead row versions left by updates and deletes. The launcher wakes up every autovacuum_naptime seconds. Tables with many changed rows are vacuumed first.",
    "Streaming replication sends write-ahead log records to standby servers. A standby replays the records to stay current with the primary. Replication slots keep segments until every standby has received them. Synchronous commit waits for a standby to confirm.",
    "The query planner estimates the cost of each possible plan. Statistics gathered by ANALYZE describe the distribution of column values. The cheapest plan is chosen and handed to the executor. Bad estimates lead to slow nested loop joins.",
    "A B-tree index keeps keys in sorted order across pages. Lookups descend from the root page to a leaf page. Range scans follow sibling links between leaf pages. Index-only scans avoid the heap when the visibility map allows.",
    "Roles own database objects and hold privileges. GRANT gives a privilege on a table to a role. Row-level security policies filter which rows a role may see. Superusers bypass every permission check.",
    "The bash shell reads startup files when it begins. Login shells read the profile file in the home directory. Interactive shells that are not login shells read bashrc instead. Aliases defined there apply to the current session.",
    "Git stores every version of a file as a blob object. Commits point to trees, which point to blobs and other trees. Branches are movable references to commits. A merge commit has two or more parents.",
];

fn write_corpus(dir: &Path) {
    for (i, text) in TOPICS.iter().enumerate() {
        let body = text.to_string();
        let name = match i % 3 {
            0 => format!("guide/topic{i}.md"),
            1 => format!("topic{i}.txt"),
            _ => format!("ref/topic{i}.html"),
        };
        let content = if name.ends_with(".html") {
            format!("<html><body><h1>Topic {i}</h1><p>{body}</p></body></html>")
        } else {
            body
        };
        let path = dir.join(&name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    std::fs::write(dir.join("broken.txt"), b"\xff\xfe binary \x00 junk").unwrap();
    std::fs::write(dir.join("empty.md"), b"").unwrap();
}

fn write_tokenizer(path: &Path) {
    let texts: Vec<String> = TOPICS.iter().map(|s| s.to_string()).collect();
    let tok = train_wordpiece(&texts, 400).unwrap();
    tok.save(path, false).unwrap();
}

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: GenerateDataArgs,
}

fn args(corpus: &Path, out: &Path, tokenizer: &Path, extra: &[&str]) -> GenerateDataArgs {
    let mut argv = vec![
        "x".to_string(),
        "--corpus".into(),
        corpus.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--tokenizer".into(),
        tokenizer.display().to_string(),
        "--chunk-size".into(),
        "32".into(),
        "--chunk-overlap".into(),
        "4".into(),
        "--chunk-min".into(),
        "10".into(),
        "--negatives".into(),
        "3".into(),
        "--test-fraction".into(),
        "0.25".into(),
        "--no-progress".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    Wrapper::parse_from(argv).args
}

fn read_outputs(out: &Path) -> (Vec<TrainRecord>, Manifest) {
    let train: Vec<TrainRecord> = std::fs::read_to_string(out.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    (train, manifest)
}

fn check_layout(out: &Path, train: &[TrainRecord], manifest: &Manifest) {
    assert!(!train.is_empty());
    for r in train {
        assert!(r.positive_id.contains("_chunk_"), "{}", r.positive_id);
        assert!(r
            .negatives
            .iter()
            .all(|n| n.id != r.positive_id && n.text != r.positive));
        assert!(!r.source_document.is_empty());
    }
    let qrels = std::fs::read_to_string(out.join("test/qrels/test.tsv")).unwrap();
    let test_chunks: Vec<&str> = qrels
        .lines()
        .skip(1)
        .map(|l| l.split('\t').nth(1).unwrap())
        .collect();
    assert_eq!(test_chunks.len(), manifest.test_queries);
    assert!(
        manifest.test_queries > 0,
        "a quarter of the chunks is held out"
    );
    assert!(
        train
            .iter()
            .all(|r| !test_chunks.contains(&r.positive_id.as_str())),
        "no chunk on both sides"
    );
    let corpus = std::fs::read_to_string(out.join("test/corpus.jsonl")).unwrap();
    let queries = std::fs::read_to_string(out.join("test/queries.jsonl")).unwrap();
    assert_eq!(queries.lines().count(), manifest.test_queries);
    assert!(corpus.lines().count() >= 8);
    let ingest = &manifest.steps[0].1;
    assert_eq!(ingest.counts["documents"], 8);
    assert_eq!(ingest.counts["skipped_binary"], 1);
    assert_eq!(ingest.counts["skipped_empty"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ict_run_writes_f058_beir_and_manifest_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus);
    let tok = tmp.path().join("tokenizer.json");
    write_tokenizer(&tok);
    let out1 = tmp.path().join("out1");
    run_generate_data(args(&corpus, &out1, &tok, &["--llm", "ict"]))
        .await
        .unwrap();
    let (train, manifest) = read_outputs(&out1);
    check_layout(&out1, &train, &manifest);
    assert_eq!(manifest.generator, "ict");
    assert!(train.iter().all(|r| r.negatives.len() <= 3));
    // Same seed, same output.
    let out2 = tmp.path().join("out2");
    run_generate_data(args(&corpus, &out2, &tok, &["--llm", "ict"]))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(out1.join("train.jsonl")).unwrap(),
        std::fs::read_to_string(out2.join("train.jsonl")).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_run_through_the_stand_in() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus);
    let tok = tmp.path().join("tokenizer.json");
    write_tokenizer(&tok);
    let s = OllamaStandin::start(StandinConfig::default())
        .await
        .unwrap();
    let out = tmp.path().join("out");
    let url = s.url();
    run_generate_data(args(
        &corpus,
        &out,
        &tok,
        &[
            "--llm",
            "ollama:standin",
            "--ollama-url",
            &url,
            "--stream",
            "--judge",
            "--round-trip-k",
            "0",
        ],
    ))
    .await
    .unwrap();
    let (train, manifest) = read_outputs(&out);
    check_layout(&out, &train, &manifest);
    assert_eq!(manifest.generator, "ollama");
    assert!(manifest.prompt_hash.is_some());
    assert!(manifest.tokens_per_second > 0.0);
    // Generation and judge requests both reached the stand-in.
    let seen = s.state.seen.requests();
    assert!(seen
        .iter()
        .any(|r| r["format"]["properties"].get("answer").is_some()));
    let missing = run_generate_data(args(
        &corpus,
        &tmp.path().join("o2"),
        &tok,
        &["--llm", "ollama:absent", "--ollama-url", &url],
    ))
    .await;
    let msg = format!("{:#}", missing.unwrap_err());
    assert!(msg.contains("ollama pull absent"), "{msg}");
}

#[tokio::test]
async fn missing_corpus_and_tokenizer_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tokenizer.json");
    let out = tmp.path().join("out");
    let err = run_generate_data(args(tmp.path(), &out, &tok, &["--llm", "ict"]))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("fetch-minilm.sh"), "{err:#}");
    write_tokenizer(&tok);
    let err = run_generate_data(args(
        &tmp.path().join("nope"),
        &out,
        &tok,
        &["--llm", "ict"],
    ))
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentence_transformers_model_can_be_the_mining_embedder() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus);
    let tok = tmp.path().join("tokenizer.json");
    write_tokenizer(&tok);
    let model = tmp.path().join("tiny");
    ragd_engine::embed::tiny::write_tiny_model(&model, TOPICS, &Default::default()).unwrap();
    let out = tmp.path().join("out");
    let spec = format!("model:{}", model.display());
    run_generate_data(args(
        &corpus,
        &out,
        &tok,
        &["--llm", "ict", "--embedder", &spec],
    ))
    .await
    .unwrap();
    let (train, manifest) = read_outputs(&out);
    check_layout(&out, &train, &manifest);
    assert_eq!(manifest.embedder, model.display().to_string());
    let bad = run_generate_data(args(&corpus, &out, &tok, &["--embedder", "bm25"]))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("model:DIR"), "{bad}");
}
