//! `ragd-worker evaluate --eval-queries`: the user's own questions (JSONL judged against the test
//! set's corpus by chunk id or passage, or a BEIR directory) are the headline and decide the
//! verdict; bad question files are refused with what to do; models that read different lengths
//! are flagged.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result};
use ragd_engine::embed::tiny::{sample_texts, write_tiny_model, TinySpec};
use ragd_tests::cluster::binary;

fn worker(args: &[&str]) -> Result<Output> {
    Command::new(binary("ragd-worker"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .context("running ragd-worker")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The tiny encoder in `tiny/`, a BEIR test set in `test/` over the sample passages (queries for
/// the first 4), and `questions.jsonl`: one question by chunk id, one by a quoted passage, one
/// whose only entry matches nothing.
fn fixture() -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let texts = sample_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    write_tiny_model(&root.join("tiny"), &refs, &TinySpec::default())?;
    let beir = root.join("test");
    std::fs::create_dir_all(beir.join("qrels"))?;
    let (mut corpus, mut queries) = (String::new(), String::new());
    let mut qrels = String::from("query-id\tcorpus-id\tscore\n");
    for (i, pair) in texts.chunks(2).enumerate() {
        let doc = serde_json::json!({"_id": format!("d{i}"), "title": "", "text": pair[0]});
        corpus.push_str(&format!("{doc}\n"));
        if i < 4 {
            let q = serde_json::json!({"_id": format!("q{i}"), "text": pair[1]});
            queries.push_str(&format!("{q}\n"));
            qrels.push_str(&format!("q{i}\td{i}\t1\n"));
        }
    }
    std::fs::write(beir.join("corpus.jsonl"), corpus)?;
    std::fs::write(beir.join("queries.jsonl"), queries)?;
    std::fs::write(beir.join("qrels/test.tsv"), qrels)?;
    let passage: String = texts[10]
        .split_whitespace()
        .take(4)
        .collect::<Vec<_>>()
        .join("  ");
    let lines = [
        serde_json::json!({"query": texts[3], "relevant": ["d1"]}),
        serde_json::json!({"query": texts[11], "relevant": [passage.to_uppercase()]}),
        serde_json::json!({"query": "where is nothing?", "relevant": ["no such passage anywhere"]}),
    ];
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(root.join("questions.jsonl"), body)?;
    Ok(tmp)
}

#[test]
fn the_users_questions_are_the_headline() -> Result<()> {
    let tmp = fixture()?;
    let root = tmp.path();
    let s = |p: &Path| p.display().to_string();
    let (model, test) = (s(&root.join("tiny")), s(&root.join("test")));
    let questions = s(&root.join("questions.jsonl"));
    let json_path = root.join("eval.json");

    let out = worker(&[
        "evaluate",
        "--model",
        &model,
        "--baseline",
        &model,
        "--test-data",
        &test,
        "--eval-queries",
        &questions,
        "--json",
        &s(&json_path),
        "--device",
        "cpu",
    ])?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let mine = stdout.find("Your questions (").context(stdout.clone())?;
    let held = stdout
        .find("Test set (the verdict above is your questions')")
        .context(stdout.clone())?;
    assert!(mine < held, "the user's questions come first:\n{stdout}");
    assert!(stdout[mine..].contains(": 2 queries"), "{stdout}");
    assert!(stdout[held..].contains(": 4 queries"), "{stdout}");
    assert!(
        stderr.contains("1 relevant entries match no document") && stderr.contains("question 3"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)?;
    assert_eq!(
        v["comparison"]["queries"], 2,
        "the verdict is the questions': {v}"
    );
    assert_eq!(v["questions"]["comparison"]["queries"], 2);
    assert_eq!(v["results"][0]["metrics"]["queries"], 4, "{v}");

    assert!(
        !stderr.contains("ICT sentences"),
        "no manifest, no note: {stderr}"
    );

    // A test set that generate-data wrote with ICT is flagged as flattering.
    std::fs::write(root.join("manifest.json"), r#"{"generator": "ict"}"#)?;
    let out = worker(&[
        "evaluate",
        "--model",
        &model,
        "--test-data",
        &test,
        "--device",
        "cpu",
    ])?;
    let err = text(&out.stderr);
    assert!(
        out.status.success() && err.contains("ICT sentences") && err.contains("--eval-queries"),
        "{err}"
    );

    // A BEIR directory brings its own corpus: no --test-data needed.
    let out = worker(&[
        "evaluate",
        "--model",
        &model,
        "--eval-queries",
        &test,
        "--device",
        "cpu",
    ])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(": 4 queries"),
        "{}",
        text(&out.stdout)
    );

    // A JSONL file names documents of a corpus it does not have.
    let out = worker(&["evaluate", "--model", &model, "--eval-queries", &questions])?;
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--test-data"),
        "{err}"
    );

    // A broken line is located; nothing at all to evaluate on is refused by the parser.
    std::fs::write(root.join("bad.jsonl"), "{\"query\": \"x\"}\n")?;
    let bad = s(&root.join("bad.jsonl"));
    let out = worker(&[
        "evaluate",
        "--model",
        &model,
        "--test-data",
        &test,
        "--eval-queries",
        &bad,
    ])?;
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.jsonl:1"),
        "{err}"
    );
    let out = worker(&["evaluate", "--model", &model])?;
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--test-data"),
        "{err}"
    );
    Ok(())
}

#[test]
fn models_that_read_different_lengths_are_flagged() -> Result<()> {
    let tmp = fixture()?;
    let root = tmp.path();
    let s = |p: &Path| p.display().to_string();
    let (model, test) = (root.join("tiny"), s(&root.join("test")));
    // The same tiny model, told to read half as many tokens.
    let short = root.join("tiny-short");
    let texts = sample_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    write_tiny_model(&short, &refs, &TinySpec::default())?;
    let config = short.join("sentence_bert_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config)?)?;
    let own = v["max_seq_length"].as_u64().context("no max_seq_length")?;
    v["max_seq_length"] = serde_json::json!(own / 2);
    std::fs::write(&config, v.to_string())?;
    let eval = |m: &Path| {
        worker(&[
            "evaluate",
            "--model",
            &s(m),
            "--baseline",
            &s(&model),
            "--test-data",
            &test,
            "--device",
            "cpu",
        ])
    };
    let out = eval(&short)?;
    let err = text(&out.stderr);
    let note = format!(
        "the model reads {} tokens per text and the baseline {own}",
        own / 2
    );
    assert!(out.status.success() && err.contains(&note), "{err}");
    let out = eval(&model)?;
    let err = text(&out.stderr);
    assert!(
        out.status.success() && !err.contains("tokens per text"),
        "{err}"
    );
    Ok(())
}
