//! Distributed jobs end to end, as separate processes on loopback: a coordinator and three
//! workers (two with Ollama stand-ins of different speeds, one without an LLM), a tiny model made
//! here. Injected failures: kill -9 of a generation worker, kill -9 of the training worker after a
//! checkpoint came home, kill -9 and restart of the coordinator, and a cancel.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ragd_tests::cluster::{free_udp_port, Proc, TestCluster};
use ragd_tests::jobs::{number_after, shards_by, write_inputs, Jobs, MODEL, TOPICS};
use ragd_tests::standin::ollama::OllamaStandin;
use ragd_tests::standin::StandinConfig;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_failures_and_split_work_by_speed() -> Result<()> {
    let fast = OllamaStandin::start(StandinConfig {
        models: vec![MODEL.into()],
        latency: Duration::from_millis(20),
        ..Default::default()
    })
    .await?;
    let slow = OllamaStandin::start(StandinConfig {
        models: vec![MODEL.into()],
        latency: Duration::from_millis(400),
        ..Default::default()
    })
    .await?;
    tokio::task::spawn_blocking(move || scenario(vec![fast, slow])).await?
}

fn scenario(standins: Vec<OllamaStandin>) -> Result<()> {
    let mut cluster = TestCluster::new()?;
    let (corpus, model) = write_inputs(cluster.root.path());
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let token = cluster.init()?;
    let mut extra: Vec<String> = vec![
        "--no-mdns".into(),
        "--heartbeat-interval".into(),
        "300ms".into(),
    ];
    for p in &ports {
        extra.push("--peer".into());
        extra.push(format!("127.0.0.1:{p}"));
    }
    cluster.start_coordinator(&extra)?;
    for i in 0..3 {
        let out = cluster.join(&format!("w{}", i + 1), &token)?;
        if !out.status.success() {
            bail!("join failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let jobs = Jobs {
        cluster,
        corpus,
        model,
        ports,
        standins,
    };
    let mut workers: Vec<Option<Proc>> = (0..3)
        .map(|i| jobs.start_worker(i).map(Some))
        .collect::<Result<_>>()?;
    jobs.cluster
        .wait_for(Duration::from_secs(30), "three ready workers", |c| {
            Ok(c.workers()?
                .iter()
                .filter(|w| w["state"] == "Ready")
                .count()
                == 3)
        })?;

    // An --out holding files ragd did not write is refused before any job starts, with or
    // without --force, and its files are left alone.
    let foreign = jobs.cluster.root.path().join("not-ragd");
    std::fs::create_dir_all(&foreign)?;
    std::fs::write(foreign.join("notes.txt"), b"mine")?;
    let foreign_arg = foreign.display().to_string();
    for force in [false, true] {
        let mut extra = vec!["--llm", "ict", "--out", foreign_arg.as_str()];
        if force {
            extra.push("--force");
        }
        let err = jobs.submit(&extra).unwrap_err().to_string();
        assert!(err.contains("not written by ragd"), "{err}");
    }
    assert_eq!(std::fs::read(foreign.join("notes.txt"))?, b"mine");

    // Job 1: generation over the two LLM workers; kill -9 the slow one mid-generation; then kill
    // -9 the training worker once a checkpoint is home. Training must outlast the test's polling
    // (about 2000 steps of the tiny model: tens of seconds; 200 steps took one).
    let id = jobs.submit(&[
        "--llm",
        &format!("ollama:{MODEL}"),
        "--epochs",
        "400",
        "--checkpoint-every",
        "50",
    ])?;
    jobs.wait(
        &id,
        "the slow worker's first shard",
        Duration::from_secs(60),
        |v, _| shards_by(v, "w2") >= 1,
    )?;
    workers[1].take().unwrap().kill9();
    let v = jobs.wait(
        &id,
        "a checkpoint brought home",
        Duration::from_secs(120),
        |_, logs| logs.contains("brought home"),
    )?;
    let logs = jobs.logs(&id)?;
    let chunks = number_after(&logs, "ingest: ").context("no ingest line")?;
    let generated = logs
        .lines()
        .find_map(|l| {
            l.split_once("generate: ")
                .and_then(|(_, r)| r.strip_suffix(" shards set aside)"))
        })
        .context("no generation summary")?
        .to_string();
    assert!(
        generated.ends_with("(0"),
        "no shard may be set aside: {generated}\n{logs}"
    );
    let n_questions: u64 = generated.split_whitespace().next().unwrap().parse()?;
    // The stand-in writes two questions per chunk; the parser drops a repeated one.
    assert!(
        (chunks..=2 * chunks).contains(&n_questions),
        "every chunk answered once: {n_questions} questions for {chunks} chunks\n{logs}"
    );
    let (f, s) = (shards_by(&v, "w1"), shards_by(&v, "w2"));
    assert_eq!(
        f + s,
        chunks,
        "every shard committed once (shard size 1): {v}"
    );
    assert!(
        f >= 3 * s,
        "the 20x faster worker takes most shards: w1 {f}, w2 {s}"
    );
    let trainer = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "train")
        .unwrap()["ran_on"]
        .as_str()
        .context("train not placed")?
        .to_string();
    let placement_line = v["stages"][3]["why"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        placement_line.starts_with(&format!("{trainer}: est.")),
        "the chosen worker has the best estimate: {placement_line}"
    );
    let idx = if trainer == "w1" { 0 } else { 2 };
    workers[idx].take().unwrap().kill9();
    let v = jobs.wait_finished(&id, "the job to finish", Duration::from_secs(240))?;
    let logs = jobs.logs(&id)?;
    eprintln!(
        "--- job 1 ---\n{logs}\n{}",
        serde_json::to_string_pretty(&v["generation_by_worker"])?
    );
    assert_eq!(v["state"], "succeeded", "{logs}");
    // The prepare stage's texts were embedded as shards over the live workers, every one of them.
    let embedded: u64 = v["embedding_by_worker"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["texts"].as_u64())
        .sum();
    assert!(embedded > 0, "no embedding shard ran: {v}");
    assert!(
        logs.contains(&format!("embed: {embedded} of {embedded} texts")),
        "every text embedded by the shards ({embedded} by the workers):\n{logs}"
    );
    assert!(logs.contains(&format!("train: {trainer} lost")), "{logs}");
    assert!(
        logs.contains("resuming on the next best node from the checkpoint of step"),
        "{logs}"
    );
    assert_ne!(
        v["training"]["worker"],
        trainer.as_str(),
        "training finished elsewhere: {v}"
    );
    let model_dir = PathBuf::from(v["model_path"].as_str().context("no model path")?);
    for f in [
        "model.safetensors",
        "config.json",
        "modules.json",
        "training_metadata.json",
        "report.html",
    ] {
        assert!(
            model_dir.join(f).is_file(),
            "{f} missing in {}",
            model_dir.display()
        );
    }
    assert!(
        v["evaluation"]["tuned"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{v}"
    );
    // The LLM wrote the held-out queries: their verdict is not flagged as resting on ICT.
    assert_eq!(v["evaluation"]["held_out_all_ict"], false, "{v}");

    // Bring the dead workers back for the next jobs.
    workers[1] = Some(jobs.start_worker(1)?);
    workers[idx] = Some(jobs.start_worker(idx)?);
    jobs.cluster
        .wait_for(Duration::from_secs(30), "three ready workers again", |c| {
            Ok(c.workers()?
                .iter()
                .filter(|w| w["state"] == "Ready")
                .count()
                == 3)
        })?;

    // The user's own questions for job 2: passages quoted from the corpus (one quotes nothing
    // there). A question file that cannot be read is refused at submission.
    let questions = jobs.corpus.with_file_name("questions.jsonl");
    let mut lines: String = [0, 1, 4, 7]
        .iter()
        .map(|&i| {
            let sentences: Vec<&str> = TOPICS[i].split(". ").collect();
            format!(
                "{}\n",
                serde_json::json!({"query": sentences[1], "relevant": [sentences[0]]})
            )
        })
        .collect();
    lines.push_str("{\"query\": \"who won?\", \"relevant\": [\"no such passage\"]}\n");
    std::fs::write(&questions, lines)?;
    let questions = questions.display().to_string();
    let err = jobs
        .submit(&[
            "--llm",
            "ict",
            "--eval-queries",
            "/nonexistent/questions.jsonl",
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read the questions"), "{err}");

    // Job 2: an embedder and a reranker; kill -9 the coordinator mid-training and restart it:
    // the job completes. (Long enough training for the kill to land in it, as in job 1.)
    let id2 = jobs.submit(&[
        "--eval-queries",
        &questions,
        "--llm",
        "ict",
        "--epochs",
        "300",
        "--checkpoint-every",
        "50",
        "--seed",
        "7",
        "--train",
        "embedder,reranker",
        "--reranker-loss",
        "mnrl",
        "--reranker-epochs",
        "3",
        "--reranker-batch-size",
        "4",
        "--rerank-depth",
        "10",
    ])?;
    jobs.wait(
        &id2,
        "training to start",
        Duration::from_secs(120),
        |v, _| {
            v["live"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|x| x.as_str().is_some_and(|s| s.starts_with("train on")))
            })
        },
    )?;
    let mut cluster = jobs.cluster;
    cluster.coordinator.as_mut().unwrap().kill9();
    let _ = std::fs::remove_file(cluster.coord_dir().join("admin.sock"));
    cluster.start_coordinator(&extra)?;
    let jobs = Jobs { cluster, ..jobs };
    let v = jobs.wait_finished(&id2, "the resumed job to finish", Duration::from_secs(240))?;
    let logs2 = jobs.logs(&id2)?;
    eprintln!("--- job 2 ---\n{logs2}");
    assert_eq!(v["state"], "succeeded", "{logs2}");
    // The user's questions are the headline and decide the verdict; the held-out one is kept.
    let ev = &v["evaluation"];
    assert_eq!(ev["questions"]["queries"], 4, "{ev}");
    assert_eq!(
        ev["questions"]["unmatched"].as_array().map(Vec::len),
        Some(1),
        "{ev}"
    );
    assert_eq!(ev["comparison"]["queries"], 4, "{ev}");
    assert!(
        ev["held_out_comparison"]["queries"].as_u64() > Some(0),
        "{ev}"
    );
    // ICT wrote every held-out query, and the evaluation says so.
    assert_eq!(ev["held_out_all_ict"], true, "{ev}");
    assert!(
        logs2.contains("coordinator restarted: resuming the job"),
        "{logs2}"
    );

    // The reranker was trained as its own stage, placed like the embedder, evaluated on the
    // embedder's candidates and exported as a BertForSequenceClassification directory.
    assert!(logs2.contains("train_reranker: placed on"), "{logs2}");
    assert!(logs2.contains("export: reranker written to"), "{logs2}");
    let rerank_rows = v["evaluation"]["rerank"]
        .as_array()
        .context("no reranking")?;
    assert_eq!(
        rerank_rows
            .iter()
            .map(|r| r["name"].as_str().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["embedder", "embedder + fine-tuned reranker"],
        "{v}"
    );
    assert!(rerank_rows.iter().all(|r| r["depth"] == 10), "{v}");
    let reranker_dir = PathBuf::from(v["reranker_path"].as_str().context("no reranker path")?);
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "training_metadata.json",
        "report.html",
    ] {
        assert!(
            reranker_dir.join(f).is_file(),
            "{f} missing in {}",
            reranker_dir.display()
        );
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(reranker_dir.join("config.json"))?)?;
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert!(!reranker_dir.join("modules.json").exists());

    // Job 3: cancel during generation with the slow stand-in only: everything stops.
    let id3 = jobs.submit(&[
        "--llm",
        &format!("ollama:{MODEL}"),
        "--on",
        "w3",
        "--seed",
        "9",
    ])?;
    jobs.wait(
        &id3,
        "generation to start",
        Duration::from_secs(60),
        |v, _| v["tasks"]["generate"]["done"].as_u64().unwrap_or(0) >= 1,
    )?;
    let t = Instant::now();
    jobs.coord(&["cancel", &id3])?;
    let v = jobs.wait_finished(&id3, "the cancel", Duration::from_secs(10))?;
    assert_eq!(v["state"], "cancelled");
    assert!(t.elapsed() < Duration::from_secs(10));
    jobs.cluster.wait_for(
        Duration::from_secs(10),
        "idle workers after the cancel",
        |c| {
            Ok(c.workers()?
                .iter()
                .all(|w| w["load"]["busy_slots"].as_u64().unwrap_or(0) == 0))
        },
    )?;

    // The registry: both finished jobs' embedders and job 2's reranker are models; promotion
    // works (forced: a tiny model may well be worse than its random base), each kind has its own
    // active model, and rollback returns to the previous embedder.
    let models: Value = serde_json::from_str(&jobs.coord(&["models", "list", "--json"])?)?;
    assert_eq!(models.as_array().map(Vec::len), Some(3), "{models}");
    // Without --force, a model that evaluates worse than what it is compared with is refused
    // (the gate's rule is unit-tested in jobs::views; here it runs through the CLI and daemon).
    for m in models.as_array().unwrap() {
        let (Some(tuned), Some(base)) = (m["ndcg@10"].as_f64(), m["base_ndcg@10"].as_f64()) else {
            continue;
        };
        let worse = if m["kind"] == "reranker" {
            tuned <= base
        } else {
            tuned < base
        };
        if worse {
            let id = m["id"].as_str().unwrap();
            let err = jobs
                .coord(&["models", "promote", id])
                .unwrap_err()
                .to_string();
            assert!(err.contains("use --force"), "{id}: {err}");
        }
    }
    let reranker_id = format!("{id2}-reranker");
    jobs.coord(&["models", "promote", &reranker_id, "--force"])?;
    jobs.coord(&["models", "promote", &id, "--force"])?;
    jobs.coord(&["models", "promote", &id2, "--force"])?;
    jobs.coord(&["models", "rollback"])?;
    let models: Value = serde_json::from_str(&jobs.coord(&["models", "list", "--json"])?)?;
    let active: Vec<(&str, &str)> = models
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["active"] == true)
        .map(|m| (m["id"].as_str().unwrap(), m["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(active.len(), 2, "{models}");
    assert!(active.contains(&(id.as_str(), "embedder")), "{models}");
    assert!(
        active.contains(&(reranker_id.as_str(), "reranker")),
        "{models}"
    );
    let err = jobs
        .coord(&["models", "rollback", "--kind", "reranker"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no earlier promoted reranker"), "{err}");
    drop(workers);
    Ok(())
}
