//! Human-readable rendering of the worker list for `ragd-coord workers`.

use crate::registry::WorkerRecord;
use crate::store::now_ms;
use ragd_shared::protocol::capabilities::Backend;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(t) => {
            let s = now_ms().saturating_sub(t) / 1000;
            if s < 120 {
                format!("{s}s ago")
            } else if s < 7200 {
                format!("{}m ago", s / 60)
            } else {
                format!("{}h ago", s / 3600)
            }
        }
    }
}

/// Renders the workers as an aligned text table.
pub fn render_workers(workers: &[WorkerRecord]) -> String {
    let header = [
        "ID",
        "HOST",
        "ADDRESS",
        "BACKEND",
        "GPU",
        "RAM",
        "LLM MODELS",
        "STATE",
        "LAST SEEN",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for w in workers {
        let caps = w.capabilities.as_ref();
        let backend = caps
            .map(|c| match c.best_backend() {
                Backend::Cpu => "cpu",
                Backend::Cuda => "cuda",
                Backend::Metal => "metal",
            })
            .unwrap_or("-");
        let gpu = caps
            .map(|c| {
                if c.gpus.is_empty() {
                    "-".to_string()
                } else {
                    c.gpus
                        .iter()
                        .map(|g| format!("{} ({:.0} GiB)", g.name, g.memory_bytes as f64 / GIB))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            })
            .unwrap_or_else(|| "-".into());
        let ram = caps
            .map(|c| format!("{:.1} GiB", c.total_memory_bytes as f64 / GIB))
            .unwrap_or_else(|| "-".into());
        let models = caps
            .map(|c| {
                let m: Vec<String> = c
                    .llm_endpoints
                    .iter()
                    .flat_map(|e| e.models.iter().cloned())
                    .collect();
                if m.is_empty() {
                    "-".into()
                } else {
                    m.join(",")
                }
            })
            .unwrap_or_else(|| "-".into());
        rows.push(vec![
            w.id.clone(),
            caps.map(|c| c.hostname.clone())
                .unwrap_or_else(|| "-".into()),
            w.addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            backend.into(),
            gpu,
            ram,
            models,
            w.state.to_string(),
            ago(w.last_seen_ms),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
