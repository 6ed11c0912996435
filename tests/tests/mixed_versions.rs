//! A newer coordinator drives an older worker: the coordinator process of this build (protocol
//! v3) and a worker, in this process, that speaks only protocol v2 (no `RunTask`; it answers one
//! with an error). Generation shards must run on it through the v2 requests (`StartTask`,
//! `PollTask`, `ForgetTask`), none set aside, as during a rolling upgrade of a home lab.
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ragd_shared::protocol::VersionRange;
use ragd_tests::cluster::{free_udp_port, TestCluster};
use ragd_tests::jobs::{number_after, shards_by, write_inputs, Jobs};
use ragd_worker::config::WorkerConfig;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v3_coordinator_runs_shards_on_a_v2_worker() -> Result<()> {
    let mut cluster = TestCluster::new()?;
    let (corpus, model) = write_inputs(cluster.root.path());
    let port = free_udp_port();
    let token = cluster.init()?;
    cluster.start_coordinator_with_peers(&[port])?;
    let cfg = WorkerConfig {
        protocol_versions: VersionRange::new(2, 2),
        ..cluster.in_process_worker("old", port)
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        ragd_worker::enrolment::join(&cfg, &token, false),
    )
    .await
    .context("the v2 worker did not enrol within 60 s")??;
    let cancel = CancellationToken::new();
    let server = tokio::spawn(ragd_worker::server::run(cfg, cancel.child_token()));
    let jobs = Jobs {
        cluster,
        corpus,
        model,
        ports: vec![port],
        standins: vec![],
    };
    let outcome = tokio::task::spawn_blocking(move || scenario(&jobs)).await?;
    cancel.cancel();
    match tokio::time::timeout(Duration::from_secs(15), server).await {
        Ok(joined) => joined?.context("the v2 worker failed")?,
        Err(_) => bail!("the v2 worker did not stop within 15 s"),
    }
    outcome
}

fn scenario(jobs: &Jobs) -> Result<()> {
    jobs.cluster
        .wait_for(Duration::from_secs(30), "the v2 worker Ready", |c| {
            Ok(c.state_of("old")?.as_deref() == Some("Ready"))
        })?;
    let workers = jobs.cluster.workers()?;
    let old = workers
        .iter()
        .find(|w| w["id"] == "old")
        .context("no worker \"old\"")?;
    assert_eq!(
        old["protocol_version"], 2,
        "the handshake settles on the worker's only version: {old}"
    );
    let id = jobs.submit(&[
        "--llm",
        "ict",
        "--queries-per-chunk",
        "1",
        "--max-steps",
        "1",
    ])?;
    let v = jobs.wait(&id, "generation", Duration::from_secs(90), |_, logs| {
        logs.contains(" shards set aside)")
    })?;
    let logs = jobs.logs(&id)?;
    let _ = jobs.coord(&["cancel", &id]);
    let shards = number_after(&logs, "chunks in ")
        .with_context(|| format!("no shard count in the job log:\n{logs}"))?;
    assert!(shards >= 2, "several shards to run: {shards}\n{logs}");
    assert!(
        logs.contains("(0 shards set aside)"),
        "every shard ran on the v2 worker, none set aside:\n{logs}"
    );
    assert_eq!(
        shards_by(&v, "old"),
        shards,
        "the v2 worker committed every shard: {v}"
    );
    Ok(())
}
