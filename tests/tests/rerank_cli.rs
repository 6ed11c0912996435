//! The reranker commands of `ragd-worker` end to end on a tiny model the test builds:
//! `train-reranker`, `rerank` (table and JSON), `evaluate --reranker`, and the refusals.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use ragd_engine::embed::tiny::{sample_texts, write_tiny_model, TinySpec};
use ragd_tests::cluster::binary;

/// Runs `ragd-worker ARGS`; Ok(stdout) on success, Err(stderr) otherwise.
fn worker(args: &[&str]) -> Result<String> {
    let out = Command::new(binary("ragd-worker"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .context("running ragd-worker")?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr))
    }
}

/// Training rows "where does the A find F?" -> "the A eats F near the P" with two negatives,
/// and a BEIR test set over the same passages.
fn write_data(dir: &Path) -> Result<()> {
    let texts = sample_texts();
    let docs: Vec<&String> = texts.iter().step_by(2).collect();
    let n = docs.len();
    let mut rows = String::new();
    let mut queries = String::new();
    let mut qrels = String::from("query-id\tcorpus-id\tscore\n");
    let mut corpus = String::new();
    for (i, c) in texts.chunks(2).enumerate() {
        // The tiny model learns 16 rows in seconds; the test queries are among them.
        if i < 16 {
            let row = serde_json::json!({"query": c[1], "positive": c[0],
                "negatives": [docs[(i + 9) % n], docs[(i + 18) % n]]});
            rows.push_str(&format!("{row}\n"));
        }
        corpus.push_str(
            &serde_json::json!({"_id": format!("d{i}"), "title": "", "text": c[0]}).to_string(),
        );
        corpus.push('\n');
        if i % 4 == 0 && i < 16 {
            queries
                .push_str(&serde_json::json!({"_id": format!("q{i}"), "text": c[1]}).to_string());
            queries.push('\n');
            qrels.push_str(&format!("q{i}\td{i}\t1\n"));
        }
    }
    std::fs::write(dir.join("rows.jsonl"), rows)?;
    let beir = dir.join("test");
    std::fs::create_dir_all(beir.join("qrels"))?;
    std::fs::write(beir.join("corpus.jsonl"), corpus)?;
    std::fs::write(beir.join("queries.jsonl"), queries)?;
    std::fs::write(beir.join("qrels/test.tsv"), qrels)?;
    // Documents to rank for row 0's query: others first, its two training negatives, and its
    // passage last, so that ranking it first is the reranker's doing.
    let docs_txt: String = [27, 13, 22, 9, 18, 0]
        .iter()
        .map(|&k| format!("{}\n", docs[k]))
        .collect();
    std::fs::write(dir.join("docs.txt"), docs_txt)?;
    Ok(())
}

/// A directory with the tiny encoder in `tiny/` and the data of [`write_data`].
fn fixture() -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    let texts = sample_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    write_tiny_model(&tmp.path().join("tiny"), &refs, &TinySpec::default())?;
    write_data(tmp.path())?;
    Ok(tmp)
}

#[test]
fn reranker_commands_train_rank_and_evaluate() -> Result<()> {
    let tmp = fixture()?;
    let root = tmp.path();
    let model = root.join("tiny");
    let s = |p: &Path| p.display().to_string();

    // A plain encoder has no reranker head: ranking with it is refused.
    let err = worker(&[
        "rerank",
        "--model",
        &s(&model),
        "--query",
        "owl",
        "--docs",
        &s(&root.join("docs.txt")),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("no trained reranker head"), "{err}");

    let out = root.join("reranker");
    let printed = worker(&[
        "train-reranker",
        "--data",
        &s(&root.join("rows.jsonl")),
        "--base-model",
        &s(&model),
        "--out",
        &s(&out),
        "--epochs",
        "20",
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--new-head-lr-scale",
        "5",
        "--loss",
        "lambda",
        "--device",
        "cpu",
        "--eval-data",
        &s(&root.join("test")),
        "--eval-embedder",
        &s(&model),
        "--depth",
        "8",
    ])?;
    assert!(
        printed.contains("embedder + fine-tuned reranker"),
        "{printed}"
    );
    assert!(printed.contains(" steps in "), "{printed}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_metadata.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.join("training_metadata.json"),
    )?)?;
    assert_eq!(meta["hyperparameters"]["loss"]["kind"], "lambda");
    assert!(meta["metrics"]["rerank_eval"]
        .as_array()
        .is_some_and(|a| a.len() == 2));

    // A training query (row 0) and its passage.
    let texts = sample_texts();
    let (query, answer) = (texts[1].as_str(), texts[0].as_str());
    let json: serde_json::Value = serde_json::from_str(&worker(&[
        "rerank",
        "--model",
        &s(&out),
        "--query",
        query,
        "--docs",
        &s(&root.join("docs.txt")),
        "--json",
        "--top",
        "5",
    ])?)?;
    let results = json["results"].as_array().context("no results")?;
    assert_eq!(results.len(), 5);
    assert_eq!(results[0]["index"], 5, "{json}");
    let scores: Vec<f64> = results
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(
        results[0]["text"], answer,
        "the trained reranker puts the answer first: {json}"
    );
    let table = worker(&[
        "rerank",
        "--model",
        &s(&out),
        "--query",
        query,
        "--docs",
        &s(&root.join("docs.txt")),
        "--top",
        "2",
    ])?;
    assert_eq!(table.lines().count(), 3, "{table}");

    let eval = worker(&[
        "evaluate",
        "--model",
        &s(&model),
        "--test-data",
        &s(&root.join("test")),
        "--reranker",
        &s(&out),
        "--baseline-reranker",
        &s(&out),
        "--depth",
        "8",
    ])?;
    for row in [
        "embedder + base reranker",
        "embedder + reranker",
        "MRR@10",
        "Recall@5",
    ] {
        assert!(eval.contains(row), "{row} missing:\n{eval}");
    }

    let err = worker(&[
        "train-reranker",
        "--data",
        &s(&root.join("rows.jsonl")),
        "--base-model",
        &s(&model),
        "--out",
        &s(&root.join("x")),
        "--loss",
        "hinge",
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown --loss \"hinge\""), "{err}");
    Ok(())
}

/// Ctrl-C stops a training run after its current step with a message naming the checkpoint to
/// resume from; the same command with `--resume` carries on from there and exports.
#[test]
fn interrupted_training_resumes_from_its_checkpoint() -> Result<()> {
    let tmp = fixture()?;
    let root = tmp.path();
    let model = root.join("tiny");
    let s = |p: &Path| p.display().to_string();
    let out = root.join("reranker");
    let args: Vec<String> = [
        "train-reranker",
        "--data",
        &s(&root.join("rows.jsonl")),
        "--base-model",
        &s(&model),
        "--out",
        &s(&out),
        "--epochs",
        "100000",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "5",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let child = Command::new(binary("ragd-worker"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !out.join("checkpoints").join("checkpoint-5").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let output = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted after"), "{stderr}");
    let resume = stderr
        .split("--resume ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .with_context(|| format!("no --resume hint in {stderr}"))?
        .to_string();
    assert!(!out.join("model.safetensors").exists(), "nothing exported");
    let step: usize = resume.rsplit('-').next().unwrap().parse()?;
    let mut again = args.clone();
    again.extend([
        "--resume".into(),
        resume,
        "--max-steps".into(),
        (step + 3).to_string(),
    ]);
    let refs: Vec<&str> = again.iter().map(String::as_str).collect();
    let printed = worker(&refs)?;
    assert!(
        printed.contains(&format!("fine-tuned reranker {} steps", step + 3)),
        "{printed}"
    );
    assert!(out.join("model.safetensors").is_file());
    Ok(())
}
