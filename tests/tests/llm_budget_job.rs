//! A job's LLM time budget holds inside a shard: with `--llm X+ict --llm-budget 0.1m` (6 s) and
//! every chunk in one shard, the worker starts no chunk once the budget has run out, so a slow
//! LLM writes for a few chunks and ICT covers the rest. (Before protocol v5 a shard leased in
//! time ran to its end: all twelve chunks, 24 seconds here.) Processes on loopback; the LLM
//! is a stand-in speaking the OpenAI API that answers one request at a time, 2 s each.

use anyhow::{ensure, Context, Result};
use ragd_tests::cluster::tail;
use ragd_tests::jobs::{number_after, with_openai_worker, TOPICS};
use ragd_tests::standin::openai::{Flavour, OpenAiStandin};
use ragd_tests::standin::StandinConfig;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_budget_stops_a_shard_between_chunks() -> Result<()> {
    let standin = OpenAiStandin::start(
        StandinConfig {
            models: vec!["slow-llm".into()],
            latency: Duration::from_secs(2),
            max_parallel: 1,
            ..Default::default()
        },
        Flavour::Full,
        None,
    )
    .await?;
    let url = format!("http://{}", standin.addr);
    let generated = tokio::task::spawn_blocking(move || scenario(url)).await??;
    let asked = standin.state.seen.requests().len();
    eprintln!(
        "chat requests: {asked}; chunks with LLM questions: {generated} of {}",
        TOPICS.len()
    );
    ensure!(
        (1..=9).contains(&asked),
        "the LLM was asked {asked} times: a 6 s budget at one answer in 2 s allows about 3 \
         requests plus those in flight (4), not all {} chunks of the shard",
        TOPICS.len()
    );
    Ok(())
}

/// Runs the job; returns how many chunks the LLM wrote questions for.
fn scenario(url: String) -> Result<u64> {
    let toml = format!("[[llm.openai_endpoints]]\nname = \"slow\"\nurl = \"{url}\"\n");
    let (jobs, _worker) = with_openai_worker(&toml, &[], 1)?;
    let shard = TOPICS.len().to_string();
    let started = Instant::now();
    let id = jobs.submit(&[
        "--llm",
        "openai:slow-llm+ict",
        "--llm-budget",
        "0.1m",
        "--shard-size",
        &shard,
        "--epochs",
        "1",
    ])?;
    let v = jobs.wait_finished(&id, "the job to finish", Duration::from_secs(180))?;
    let worker_log =
        std::fs::read_to_string(jobs.cluster.root.path().join("worker-w1.log")).unwrap_or_default();
    let logs = format!(
        "{}\n--- worker log ---\n{}",
        jobs.logs(&id)?,
        tail(&worker_log, 30)
    );
    ensure!(v["state"] == "succeeded", "{v}\n{logs}");
    ensure!(
        logs.lines().any(|l| l.ends_with(&format!(
            "generate: {shard} chunks in 1 shards with openai:slow-llm"
        ))),
        "every chunk was to go to the LLM in one shard:\n{logs}"
    );
    let covered = number_after(&logs, "openai:slow-llm wrote questions for ")
        .with_context(|| format!("no count of the LLM's chunks in the log:\n{logs}"))?;
    ensure!(
        (1..TOPICS.len() as u64).contains(&covered),
        "the LLM wrote for {covered} chunks: some, not all, within a 6 s budget\n{logs}"
    );
    ensure!(
        logs.contains(&format!(
            "ICT covers the other {}",
            TOPICS.len() as u64 - covered
        )),
        "ICT covers the chunks the LLM did not reach:\n{logs}"
    );
    eprintln!("job done in {:.1?}", started.elapsed());
    Ok(covered)
}
