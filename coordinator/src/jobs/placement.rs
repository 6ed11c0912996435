//! Where training runs: a cost model over the ready workers.
//!
//! For each candidate: its measured training throughput for this model on its device (a short
//! calibration run, cached per worker and model), the time to move what it lacks (dataset, base
//! model) at [`LAN_BYTES_PER_SEC`], a queue penalty when all its slots are busy, and whether the
//! training engine's memory estimate fits its (GPU or system) memory. The fastest estimated
//! completion wins: a GPU node wins when it is faster, not by rule.

use crate::report::PlacementRow;

/// Transfer rate assumed on the LAN (bytes/s), a conservative figure for gigabit Ethernet/Wi-Fi 6.
pub const LAN_BYTES_PER_SEC: f64 = 50e6;

/// What is known about one candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateFacts {
    /// Worker id.
    pub worker: String,
    /// Device the calibration ran on (`cpu`, `cuda:0`, ...).
    pub device: String,
    /// Calibrated training pairs/s (`None` when calibration failed).
    pub pairs_per_sec: Option<f64>,
    /// Bytes the worker still lacks (dataset, base model, checkpoint).
    pub bytes_missing: u64,
    /// Whether every work slot is busy.
    pub busy: bool,
    /// Estimated peak memory of the run, bytes.
    pub memory_needed: u64,
    /// Memory the worker offers for it, bytes.
    pub memory_available: u64,
    /// Why the candidate cannot be used at all, if so.
    pub excluded: Option<String>,
}

/// Estimated seconds to completion, or why there is none.
pub fn estimate(c: &CandidateFacts, pairs_to_train: f64) -> Result<f64, String> {
    if let Some(why) = &c.excluded {
        return Err(why.clone());
    }
    let Some(pps) = c.pairs_per_sec.filter(|p| *p > 0.0) else {
        return Err("no throughput measured".into());
    };
    if c.memory_available > 0 && c.memory_needed > c.memory_available {
        return Err(format!(
            "needs ~{} MiB, has {} MiB",
            c.memory_needed >> 20,
            c.memory_available >> 20
        ));
    }
    let train = pairs_to_train / pps;
    let transfer = c.bytes_missing as f64 / LAN_BYTES_PER_SEC;
    // A busy worker first finishes what it runs; assume a run of similar length.
    let queue = if c.busy { train } else { 0.0 };
    Ok(train + transfer + queue)
}

/// Formats seconds as "45 s" / "6 min" / "1.5 h".
pub fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.0} s")
    } else if s < 3600.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// Ranks the candidates; returns the rows (chosen one marked) and the chosen index.
pub fn choose(facts: &[CandidateFacts], pairs_to_train: f64) -> (Vec<PlacementRow>, Option<usize>) {
    let estimates: Vec<Result<f64, String>> =
        facts.iter().map(|c| estimate(c, pairs_to_train)).collect();
    let best = estimates
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.as_ref().ok().map(|s| (i, *s)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i);
    let rows = facts
        .iter()
        .zip(&estimates)
        .enumerate()
        .map(|(i, (c, e))| PlacementRow {
            worker: c.worker.clone(),
            device: c.device.clone(),
            estimate_secs: e.as_ref().ok().copied(),
            chosen: Some(i) == best,
            note: match e {
                Ok(_) => format!(
                    "{:.1} pairs/s{}{}",
                    c.pairs_per_sec.unwrap_or(0.0),
                    if c.bytes_missing > 0 {
                        format!(", {} MiB to send", c.bytes_missing >> 20)
                    } else {
                        String::new()
                    },
                    if c.busy { ", busy" } else { "" }
                ),
                Err(why) => why.clone(),
            },
        })
        .collect();
    (rows, best)
}

/// One line explaining the choice: "desktop: est. 6 min (cuda:0) vs laptop: est. 48 min (cpu)".
pub fn explain(rows: &[PlacementRow]) -> String {
    let mut sorted: Vec<&PlacementRow> = rows.iter().collect();
    sorted.sort_by(|a, b| {
        b.chosen.cmp(&a.chosen).then(
            a.estimate_secs
                .unwrap_or(f64::MAX)
                .total_cmp(&b.estimate_secs.unwrap_or(f64::MAX)),
        )
    });
    sorted
        .iter()
        .map(|r| match r.estimate_secs {
            Some(s) => format!("{}: est. {} ({})", r.worker, human_secs(s), r.device),
            None => format!("{}: not used ({})", r.worker, r.note),
        })
        .collect::<Vec<_>>()
        .join(" vs ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(worker: &str, device: &str, pps: f64) -> CandidateFacts {
        CandidateFacts {
            worker: worker.into(),
            device: device.into(),
            pairs_per_sec: Some(pps),
            bytes_missing: 0,
            busy: false,
            memory_needed: 1 << 30,
            memory_available: 8 << 30,
            excluded: None,
        }
    }

    #[test]
    fn the_fastest_completion_wins_not_the_gpu() {
        let gpu_slow = CandidateFacts {
            bytes_missing: 5_000_000_000,
            ..facts("desktop", "cuda:0", 400.0)
        };
        let cpu = facts("laptop", "cpu", 40.0);
        // 4,000 pairs: GPU 10 s + 100 s transfer; CPU 100 s: the CPU wins.
        let (rows, best) = choose(&[gpu_slow.clone(), cpu.clone()], 4000.0);
        assert_eq!(best, Some(1));
        assert!(rows[1].chosen && !rows[0].chosen);
        // 400,000 pairs: GPU 1,000 s + 100 s; CPU 10,000 s: the GPU wins.
        let (rows, best) = choose(&[gpu_slow, cpu], 400_000.0);
        assert_eq!(best, Some(0));
        let line = explain(&rows);
        assert!(
            line.starts_with("desktop: est. 18 min (cuda:0) vs laptop: est. 2.8 h (cpu)"),
            "{line}"
        );
    }

    #[test]
    fn memory_busy_and_exclusions_count() {
        let big = CandidateFacts {
            memory_needed: 16 << 30,
            ..facts("mini", "cpu", 1000.0)
        };
        assert!(estimate(&big, 100.0).unwrap_err().contains("MiB"));
        let busy = CandidateFacts {
            busy: true,
            ..facts("a", "cpu", 10.0)
        };
        assert_eq!(estimate(&busy, 100.0).unwrap(), 20.0);
        let gone = CandidateFacts {
            excluded: Some("lost during this job".into()),
            ..facts("b", "cpu", 10.0)
        };
        let (rows, best) = choose(&[gone], 100.0);
        assert_eq!(best, None);
        assert!(explain(&rows).contains("not used (lost during this job)"));
        assert_eq!(human_secs(45.0), "45 s");
        assert_eq!(human_secs(360.0), "6 min");
    }
}
