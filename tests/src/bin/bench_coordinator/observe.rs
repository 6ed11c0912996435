//! What the benchmark reads while the coordinator works: the generate stage's progress and the
//! job's state from `jobs.db` (read-only), processes' CPU time from `/proc`, and how figures are
//! printed.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::Result;
use rusqlite::{Connection, OptionalExtension};

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat`.
pub(crate) fn cpu_secs(pid: &str, tick: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / tick)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 where it cannot be read).
pub(crate) fn clock_tick() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A stage's state, start and end (milliseconds since the epoch).
pub(crate) type StageRow = (String, Option<i64>, Option<i64>);
/// CPU seconds of the coordinator and of this process, where readable.
pub(crate) type CpuSample = (Option<f64>, Option<f64>);

/// The generate stage's state and timestamps, whether it has shards, and whether any is still
/// pending or leased: index lookups only, so polling often does not load the machine being
/// measured (a count by state reads every shard); every statement is prepared once.
pub(crate) fn progress(db: &Connection, job: &str) -> Result<(Option<StageRow>, bool, bool)> {
    let stage = db
        .prepare_cached(
            "SELECT state, started_ms, finished_ms FROM stages WHERE job_id = ?1 AND name = 'generate'",
        )?
        .query_row([job], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let mut exists = db.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM tasks WHERE job_id = ?1 AND stage = 'generate' AND state = ?2)",
    )?;
    let mut has = |state: &str| exists.query_row([job, state], |r| r.get::<_, bool>(0));
    let open = has("pending")? || has("leased")?;
    let any = open
        || db
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM tasks WHERE job_id = ?1 AND stage = 'generate')",
            )?
            .query_row([job], |r| r.get::<_, bool>(0))?;
    Ok((stage, any, open))
}

/// The generate stage's task counts by state.
pub(crate) fn counts(db: &Connection, job: &str) -> Result<BTreeMap<String, u64>> {
    let mut stmt = db.prepare_cached(
        "SELECT state, COUNT(*) FROM tasks WHERE job_id = ?1 AND stage = 'generate' GROUP BY state",
    )?;
    let counts = stmt
        .query_map([job], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?
        .collect::<rusqlite::Result<BTreeMap<_, _>>>()?;
    Ok(counts)
}

/// The job's state and error.
pub(crate) fn job_state(db: &Connection, job: &str) -> Result<(String, Option<String>)> {
    Ok(db
        .prepare_cached("SELECT state, error FROM jobs WHERE id = ?1")?
        .query_row([job], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Percentiles of sorted latencies in seconds, in milliseconds.
pub(crate) struct LatencyMs {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl LatencyMs {
    /// The percentiles of `sorted` (seconds), NaN when it is empty.
    pub(crate) fn of(sorted: &[f64]) -> Self {
        let ms = |p: f64| percentile(sorted, p) * 1000.0;
        Self {
            p50: ms(50.0),
            p90: ms(90.0),
            p99: ms(99.0),
            max: sorted.last().map_or(f64::NAN, |s| s * 1000.0),
        }
    }
}

/// `12345` as `12,345`.
pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
