//! Jobs on a [`TestCluster`]: the small corpus and tiny model the job tests use, submitting with
//! small settings, and waiting on a job's state.

use crate::cluster::{run, spawn, tail, Proc, TestCluster};
use crate::standin::ollama::OllamaStandin;
use anyhow::{bail, Context, Result};
use ragd_engine::embed::tiny::{write_tiny_model, TinySpec};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The model name the Ollama stand-ins serve.
pub const MODEL: &str = "standin-qwen";

/// The corpus: one short document per topic.
pub const TOPICS: &[&str] = &[
    "Checkpoints write every dirty buffer to disk. The checkpointer runs at intervals set by checkpoint_timeout. A crash replays the write-ahead log from the last checkpoint.",
    "Autovacuum launches worker processes that vacuum tables. Each worker removes dead row versions left by updates and deletes. Tables with many changed rows are vacuumed first.",
    "Streaming replication sends write-ahead log records to standby servers. A standby replays the records to stay current with the primary. Replication slots keep segments until standbys have them.",
    "The query planner estimates the cost of each possible plan. Statistics gathered by analyze describe the distribution of column values. Bad estimates lead to slow nested loop joins.",
    "A btree index keeps keys in sorted order across pages. Lookups descend from the root page to a leaf page. Range scans follow sibling links between leaf pages.",
    "Roles own database objects and hold privileges. Grant gives a privilege on a table to a role. Row level security policies filter which rows a role may see.",
    "The bash shell reads startup files when it begins. Login shells read the profile file in the home directory. Aliases defined there apply to the current session.",
    "Git stores every version of a file as a blob object. Commits point to trees, which point to blobs and other trees. Branches are movable references to commits.",
    "Rust ownership rules decide when memory is freed. Borrowing lends access without moving values. The borrow checker rejects dangling references at compile time.",
    "Tokio schedules asynchronous tasks on worker threads. Futures make progress when they are polled. Blocking calls belong on the dedicated blocking thread pool.",
    "Sourdough bread rises with wild yeast and bacteria. The starter is fed flour and water every day. Long fermentation gives the crumb its sour flavour.",
    "Espresso forces hot water through finely ground coffee. Crema forms from oils and carbon dioxide. Baristas adjust the grind to control extraction time.",
];

/// A cluster running jobs, with the inputs they use.
pub struct Jobs {
    /// The processes.
    pub cluster: TestCluster,
    /// The corpus directory.
    pub corpus: PathBuf,
    /// The base model directory.
    pub model: PathBuf,
    /// The workers' listening ports (worker i is `w{i+1}`).
    pub ports: Vec<u16>,
    /// Ollama stand-ins, worker i using the i-th when there is one.
    pub standins: Vec<OllamaStandin>,
}

impl Jobs {
    /// Runs `ragd-coord ARGS` and returns its output.
    pub fn coord(&self, args: &[&str]) -> Result<String> {
        run(self.cluster.coord_cmd().args(args))
    }

    /// Starts worker `i` (`w{i+1}`) on its port, with its stand-in if it has one.
    pub fn start_worker(&self, i: usize) -> Result<Proc> {
        let name = format!("w{}", i + 1);
        let mut cmd = self.cluster.worker_cmd(&name);
        cmd.args([
            "--no-mdns",
            "run",
            "--listen",
            &format!("127.0.0.1:{}", self.ports[i]),
        ]);
        if let Some(s) = self.standins.get(i) {
            cmd.env("RAGD_WORKER_LLM__OLLAMA_URL", s.url());
        }
        spawn(
            cmd,
            &self.cluster.root.path().join(format!("worker-{name}.log")),
        )
    }

    /// Submits a job on the corpus and model with small settings plus `extra` (a flag given
    /// there replaces the small setting of the same flag); returns its id.
    pub fn submit(&self, extra: &[&str]) -> Result<String> {
        let (corpus, model) = (
            self.corpus.display().to_string(),
            self.model.display().to_string(),
        );
        let small = [
            ("--chunk-size", "40"),
            ("--chunk-overlap", "4"),
            ("--chunk-min", "8"),
            ("--shard-size", "1"),
            ("--negatives", "1"),
            ("--test-fraction", "0.25"),
            ("--round-trip-k", "0"),
            ("--batch-size", "4"),
        ];
        let mut args = vec![
            "submit",
            "--corpus",
            &corpus,
            "--base-model",
            &model,
            "--json",
        ];
        for (flag, value) in small {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let out = self.coord(&args)?;
        let v: Value =
            serde_json::from_str(out.trim()).with_context(|| format!("submit said {out:?}"))?;
        Ok(v["id"].as_str().context("no job id")?.to_string())
    }

    /// `jobs show ID --json`, parsed.
    pub fn show(&self, id: &str) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.coord(&["jobs", "show", id, "--json"])?,
        )?)
    }

    /// The job's log.
    pub fn logs(&self, id: &str) -> Result<String> {
        self.coord(&["logs", id])
    }

    /// Waits until the job has ended (succeeded, failed or cancelled); returns its details.
    pub fn wait_finished(&self, id: &str, what: &str, limit: Duration) -> Result<Value> {
        self.wait(id, what, limit, |v, _| v["state"] != "running")
    }

    /// Waits until `pred` holds for the job's details.
    pub fn wait(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value, &str) -> bool,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            // The log first: the status read after it holds at least what the log tells (a
            // status read first could predate a line the predicate then matches).
            if let (Ok(logs), Ok(v)) = (self.logs(id), self.show(id)) {
                if pred(&v, &logs) {
                    return Ok(v);
                }
                if v["state"] != "running" && !pred(&v, &logs) {
                    bail!("job {id} ended ({}) before {what}:\n{logs}", v["state"]);
                }
            }
            if start.elapsed() > limit {
                bail!(
                    "timed out waiting for {what}\n--- job log ---\n{}\n--- coordinator log ---\n{}",
                    self.logs(id).unwrap_or_default(),
                    tail(&self.cluster.coordinator.as_ref().map(|c| c.log_text()).unwrap_or_default(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A job cluster of one worker, `w1`, whose LLMs are the OpenAI-compatible endpoints its
/// `worker_toml` lists (`[[llm.openai_endpoints]]`), run with `env`; returns once `w1` is Ready
/// with `endpoints` endpoints, with its process (dropping it stops the worker).
pub fn with_openai_worker(
    worker_toml: &str,
    env: &[(&str, &str)],
    endpoints: usize,
) -> Result<(Jobs, Proc)> {
    let mut cluster = TestCluster::new()?;
    let (corpus, model) = write_inputs(cluster.root.path());
    let port = crate::cluster::free_udp_port();
    let token = cluster.init()?;
    cluster.start_coordinator_with_peers(&[port])?;
    let out = cluster.join("w1", &token)?;
    if !out.status.success() {
        bail!("join: {}", String::from_utf8_lossy(&out.stderr));
    }
    let config = cluster.root.path().join("worker.toml");
    std::fs::write(&config, worker_toml)?;
    let mut cmd = cluster.worker_cmd("w1");
    cmd.env("RAGD_WORKER_CONFIG", &config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(["--no-mdns", "run", "--listen", &format!("127.0.0.1:{port}")]);
    let worker = spawn(cmd, &cluster.root.path().join("worker-w1.log"))?;
    cluster.wait_for(
        Duration::from_secs(30),
        "w1 Ready with its endpoints",
        |c| {
            Ok(c.workers()?.iter().any(|w| {
                w["state"] == "Ready"
                    && w["capabilities"]["llm_endpoints"]
                        .as_array()
                        .is_some_and(|e| e.len() == endpoints)
            }))
        },
    )?;
    let jobs = Jobs {
        cluster,
        corpus,
        model,
        ports: vec![port],
        standins: Vec::new(),
    };
    Ok((jobs, worker))
}

/// Shards of a job that `worker` committed.
pub fn shards_by(v: &Value, worker: &str) -> u64 {
    v["generation_by_worker"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["worker"] == worker)
        .and_then(|w| w["shards"].as_u64())
        .unwrap_or(0)
}

/// The number after `prefix` on the first log line that has it.
pub fn number_after(logs: &str, prefix: &str) -> Option<u64> {
    logs.lines()
        .find_map(|l| l.split_once(prefix))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
}

/// Writes the corpus (one document per topic) and a tiny model of its vocabulary under `root`.
pub fn write_inputs(root: &Path) -> (PathBuf, PathBuf) {
    let corpus = root.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for (i, t) in TOPICS.iter().enumerate() {
        std::fs::write(corpus.join(format!("doc{i}.md")), t).unwrap();
    }
    let model = root.join("tiny-model");
    write_tiny_model(
        &model,
        TOPICS,
        &TinySpec {
            max_positions: 64,
            ..Default::default()
        },
    )
    .unwrap();
    (corpus, model)
}
