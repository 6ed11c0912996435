//! What `bench_coordinator` prints: each run's table row, its latency split, the spread over
//! workers and the CPU; with `--runs`, the range of every figure over the runs.

use super::observe::{thousands, LatencyMs};
use super::POLL_MS;
use std::collections::BTreeMap;

/// What one run measured.
pub(crate) struct Measured {
    /// Shards of the generate stage (one task each).
    pub(crate) shards: u64,
    /// The stage's wall time as polled: first poll that sees it running to the first that sees
    /// every shard done.
    pub(crate) polled_secs: f64,
    /// The stage's wall time by the coordinator's own timestamps.
    pub(crate) stage_secs: Option<f64>,
    /// Lease-to-commit seconds of every done task, sorted.
    pub(crate) latencies: Vec<f64>,
    /// The same, of the first wave (the tasks of index below the worker count: every lane
    /// leases one at once when the stage starts) and of the tasks after it, each sorted.
    pub(crate) waves: (Vec<f64>, Vec<f64>),
    /// Done shards per worker.
    pub(crate) per_worker: BTreeMap<String, u64>,
    /// Tasks that needed more than one attempt.
    pub(crate) retried: u64,
    /// Tasks not done when the stage ended.
    pub(crate) set_aside: u64,
    /// CPU seconds of the coordinator process during the stage.
    pub(crate) coord_cpu: Option<f64>,
    /// CPU seconds of this process (every simulated worker) during the stage.
    pub(crate) self_cpu: Option<f64>,
}

impl Measured {
    /// Tasks per second (shards / polled wall time).
    fn rate(&self) -> f64 {
        self.shards as f64 / self.polled_secs
    }

    /// Mean lease-to-commit seconds.
    fn mean(&self) -> f64 {
        self.latencies.iter().sum::<f64>() / self.latencies.len().max(1) as f64
    }

    /// CPU microseconds a task spent in a process that used `secs` during the stage.
    fn per_task_us(&self, secs: Option<f64>) -> Option<f64> {
        secs.map(|c| 1e6 * c / self.shards.max(1) as f64)
    }
}

/// Prints one run: the table row, the latency split, the spread over workers and the CPU.
pub(crate) fn print_run(workers: usize, m: &Measured) {
    let (rate, mean) = (m.rate(), m.mean());
    let all = LatencyMs::of(&m.latencies);
    println!(
        "coordinator overhead: {} no-op tasks over {workers} simulated workers on loopback",
        thousands(m.shards),
    );
    println!(
        "(ICT shards of one chunk, shard size 1, one lane per worker; workers in one process, coordinator a separate process)"
    );
    println!();
    println!(
        "{:>7} {:>7} {:>10} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "workers",
        "tasks",
        "gen s",
        "stage s",
        "tasks/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "mean ms"
    );
    println!(
        "{:>7} {:>7} {:>10.2} {:>10} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        workers,
        m.shards,
        m.polled_secs,
        m.stage_secs
            .map_or_else(|| "-".to_string(), |s| format!("{s:.2}")),
        rate,
        all.p50,
        all.p90,
        all.p99,
        all.max,
        mean * 1000.0,
    );
    println!();
    println!("tasks/s: {rate:.1} (shards / generate wall time, {POLL_MS} ms polls of jobs.db)");
    print_dispatch_latency(&all, m.latencies.len(), &m.waves);
    let counts: Vec<u64> = m.per_worker.values().copied().collect();
    println!(
        "shards per worker: min {}, max {} ({} of {workers} workers took shards)",
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0),
        counts.len(),
    );
    println!(
        "lane occupancy: {:.2} (tasks/s x mean latency / workers: the share of each lane's time inside lease-to-commit)",
        rate * mean / workers as f64
    );
    println!("retried tasks: {}, not done: {}", m.retried, m.set_aside);
    let cpu = |c: Option<f64>| match (c, m.per_task_us(c)) {
        (Some(c), Some(us)) => format!(
            "{c:.2} s ({:.0}% of one core, {us:.1} us a task)",
            100.0 * c / m.polled_secs
        ),
        _ => "?".to_string(),
    };
    println!(
        "CPU during generation: coordinator {}, this process (all workers) {}; {} cores",
        cpu(m.coord_cpu),
        cpu(m.self_cpu),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

/// Prints the dispatch latency of all `count` tasks (`all`), then of the first wave and of the
/// tasks after it (`waves`, sorted seconds).
fn print_dispatch_latency(all: &LatencyMs, count: usize, waves: &(Vec<f64>, Vec<f64>)) {
    println!(
        "dispatch latency (lease to commit per task, {count} tasks): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        all.p50, all.p90, all.p99, all.max,
    );
    for (name, w) in [
        ("the first wave (every lane leasing at once)", &waves.0),
        ("after it", &waves.1),
    ] {
        let l = LatencyMs::of(w);
        let n = w.len();
        println!(
            "  {name}, {n} tasks: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            l.p50, l.p99, l.max
        );
    }
}

/// The smallest, median and largest of `values` (NaN left out), as `min / median / max`.
fn spread(mut values: Vec<f64>, decimals: usize) -> String {
    values.retain(|v| !v.is_nan());
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return "?".to_string();
    }
    let n = values.len();
    let median = (values[(n - 1) / 2] + values[n / 2]) / 2.0;
    let (lo, hi) = (values[0], values[values.len() - 1]);
    format!("{lo:.decimals$} / {median:.decimals$} / {hi:.decimals$}")
}

/// Prints the range of each figure over `runs`: on a shared machine the speed moves from one run
/// to the next, so a range says more than any one run.
pub(crate) fn print_range(runs: &[Measured]) {
    let of = |f: &dyn Fn(&Measured) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let us = |pick: &dyn Fn(&Measured) -> Option<f64>| {
        of(&|m| m.per_task_us(pick(m)).unwrap_or(f64::NAN))
    };
    let latency: Vec<LatencyMs> = runs.iter().map(|m| LatencyMs::of(&m.latencies)).collect();
    let ms = |f: &dyn Fn(&LatencyMs) -> f64| latency.iter().map(f).collect::<Vec<f64>>();
    let rows = [
        ("tasks/s", spread(of(&|m| m.rate()), 0)),
        ("p50 ms", spread(ms(&|l| l.p50), 1)),
        ("p99 ms", spread(ms(&|l| l.p99), 1)),
        ("max ms", spread(ms(&|l| l.max), 1)),
        ("coordinator us/task", spread(us(&|m| m.coord_cpu), 1)),
        ("workers us/task", spread(us(&|m| m.self_cpu), 1)),
    ];
    println!();
    println!("over {} runs (min / median / max):", runs.len());
    for (name, value) in rows {
        println!("  {name:<20} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_gives_min_median_max_without_nan() {
        assert_eq!(spread(vec![3.0, f64::NAN, 1.0, 2.0], 1), "1.0 / 2.0 / 3.0");
        assert_eq!(spread(vec![4.0, 1.0, 2.0, 3.0], 1), "1.0 / 2.5 / 4.0");
        assert_eq!(spread(vec![f64::NAN], 1), "?");
    }
}
