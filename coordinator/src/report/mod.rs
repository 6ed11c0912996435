//! Self-contained HTML report for one fine-tuning job.
//!
//! [`render_html`] turns a [`JobReport`] into a single HTML document with inline CSS and inline
//! SVG charts: no scripts, fonts, images or other external resources, so the file
//! opens offline. Every string taken from the report is HTML-escaped.

use std::collections::BTreeMap;

use ragd_engine::eval::compare::Comparison;

mod charts;
mod html;
mod sections;
use html::*;
use sections::*;

/// Everything the HTML report shows about one job.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct JobReport {
    /// Job identifier.
    pub job_id: String,
    /// Job state: "succeeded", "failed", "cancelled" or "running".
    pub state: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Finish time, RFC 3339, once the job has ended.
    pub finished: Option<String>,
    /// Corpus path or name.
    pub corpus: String,
    /// Embedding model being fine-tuned.
    pub base_model: String,
    /// LLM used to generate training queries.
    pub llm: String,
    /// Error message when the job failed.
    pub error: Option<String>,
    /// Pipeline stages in order.
    pub stages: Vec<StageReport>,
    /// Query generation work done by each worker.
    pub generation_by_worker: Vec<WorkerShare>,
    /// Training losses as (step, loss).
    pub losses: Vec<(usize, f32)>,
    /// Training throughput in pairs per second.
    pub pairs_per_sec: Option<f64>,
    /// Device training ran on, e.g. "cuda:0".
    pub training_device: Option<String>,
    /// Worker training ran on.
    pub training_worker: Option<String>,
    /// Candidate placements considered for training.
    pub placement: Vec<PlacementRow>,
    /// Evaluation results, one per Matryoshka dimension.
    pub eval: Vec<EvalDim>,
    /// The reranker's training and reranking evaluation, when the job trained one.
    #[serde(default)]
    pub reranker: Option<RerankerReport>,
    /// Base vs fine-tuned with intervals and the verdict, when the job evaluated an embedder.
    #[serde(default)]
    pub verdict: Option<VerdictReport>,
}

/// What decided the verdict, and the held-out figures beside it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VerdictReport {
    /// What the headline was measured on (the user's questions, or the held-out queries).
    pub judged_on: String,
    /// The headline comparison (the verdict `models promote` goes by).
    pub comparison: Comparison,
    /// The held-out queries' comparison, when the user's questions took the headline.
    pub held_out: Option<Comparison>,
    /// A warning to show beside it (ICT-written held-out queries flatter the model).
    pub note: Option<String>,
    /// The headline's queries compared at each Matryoshka dimension, widest first.
    #[serde(default)]
    pub per_dim: Vec<(usize, Comparison)>,
}

/// The reranker part of a job.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RerankerReport {
    /// Loss per step.
    pub losses: Vec<(usize, f32)>,
    /// Scored pairs per second while training.
    pub pairs_per_sec: Option<f64>,
    /// Training device.
    pub device: Option<String>,
    /// Training worker.
    pub worker: Option<String>,
    /// Placement of the training run.
    pub placement: Vec<PlacementRow>,
    /// Reranking metrics: the embedder alone first, then each reranker.
    pub eval: Vec<ragd_engine::rerank::eval::RerankMetrics>,
}

/// One pipeline stage of a job.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// Stage state.
    pub state: String,
    /// Where the stage ran (worker or "coordinator").
    pub ran_on: String,
    /// Why it ran there.
    pub why: String,
    /// Wall-clock duration in seconds, when known.
    pub seconds: Option<f64>,
    /// Named counters (chunks, queries, pairs, ...).
    pub counts: BTreeMap<String, u64>,
}

/// Query generation work done by one worker.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WorkerShare {
    /// Worker name or id.
    pub worker: String,
    /// Shards processed.
    pub shards: u64,
    /// Queries generated.
    pub queries: u64,
    /// Seconds spent generating.
    pub seconds: f64,
}

/// One candidate placement for the training stage.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PlacementRow {
    /// Worker name or id.
    pub worker: String,
    /// Device on that worker.
    pub device: String,
    /// Estimated training time in seconds, when one could be made.
    pub estimate_secs: Option<f64>,
    /// Whether this placement was chosen.
    pub chosen: bool,
    /// Free-form note (why chosen or rejected).
    pub note: String,
}

/// Evaluation metrics at one Matryoshka dimension.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct EvalDim {
    /// Embedding dimension.
    pub dim: usize,
    /// (metric name, base score, fine-tuned score).
    pub metrics: Vec<(String, f64, f64)>,
}

/// Renders the report as one HTML document.
pub fn render_html(report: &JobReport) -> String {
    let r = report;
    let id = escape(&r.job_id);
    let mut o = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>ragd job {id}</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
         <h1>Fine-tuning job {id} <span class=\"badge {}\">{}</span></h1>\n<dl>\n",
        state_class(&r.state),
        escape(&r.state)
    );
    let finished = r.finished.as_deref().unwrap_or("—");
    for (k, v) in [
        ("Created", r.created.as_str()),
        ("Finished", finished),
        ("Corpus", &r.corpus),
        ("Base model", &r.base_model),
        ("LLM", &r.llm),
    ] {
        o.push_str(&format!("<dt>{k}</dt><dd>{}</dd>\n", escape(v)));
    }
    o.push_str("</dl>\n");
    if let Some(e) = &r.error {
        o.push_str(&format!("<div class=\"error\">{}</div>\n", escape(e)));
    }

    o.push_str("<h2>Stages</h2>\n");
    if r.stages.is_empty() {
        o.push_str("<p class=\"muted\">no stages recorded</p>\n");
    } else {
        o.push_str(&table_head(&[
            "Stage", "State", "Ran on", "Why", "Seconds", "Counts",
        ]));
        for s in &r.stages {
            let counts: Vec<String> = s.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
            o.push_str(&table_row(
                "",
                &[
                    ("", escape(&s.name)),
                    (state_class(&s.state), escape(&s.state)),
                    ("", escape(&s.ran_on)),
                    ("", escape(&s.why)),
                    ("n", s.seconds.map_or_else(|| "—".into(), |v| num(v, 1))),
                    ("", escape(&counts.join(", "))),
                ],
            ));
        }
        o.push_str("</table>\n");
    }

    filter_section(&mut o, &r.stages);

    o.push_str("<h2>Query generation per worker</h2>\n");
    if r.generation_by_worker.is_empty() {
        o.push_str("<p class=\"muted\">no generation work recorded</p>\n");
    } else {
        let total: u64 = r.generation_by_worker.iter().map(|w| w.queries).sum();
        o.push_str(&table_head(&[
            "Worker", "Shards", "Queries", "Seconds", "Share",
        ]));
        for w in &r.generation_by_worker {
            let share = if total == 0 {
                "—".into()
            } else {
                format!("{:.1} %", w.queries as f64 * 100.0 / total as f64)
            };
            o.push_str(&table_row(
                "",
                &[
                    ("", escape(&w.worker)),
                    ("n", w.shards.to_string()),
                    ("n", w.queries.to_string()),
                    ("n", num(w.seconds, 1)),
                    ("n", share),
                ],
            ));
        }
        o.push_str("</table>\n");
    }

    o.push_str("<h2>Training</h2>\n");
    training_section(
        &mut o,
        &r.losses,
        r.pairs_per_sec,
        &r.training_device,
        &r.training_worker,
        &r.placement,
    );
    if let Some(v) = &r.verdict {
        verdict_section(&mut o, v);
    }
    o.push_str("<h2>Evaluation</h2>\n");
    if r.eval.is_empty() {
        o.push_str("<p class=\"muted\">no evaluation recorded</p>\n");
    }
    for d in &r.eval {
        o.push_str(&format!("<h3>dim {}</h3>\n", d.dim));
        o.push_str(&table_head(&["Metric", "Base", "Fine-tuned", "Delta"]));
        for (name, base, tuned) in &d.metrics {
            let (text, cls) = delta(*base, *tuned);
            let delta_cls = match cls {
                "pos" => "n pos",
                "neg" => "n neg",
                _ => "n",
            };
            o.push_str(&table_row(
                "",
                &[
                    ("", escape(name)),
                    ("n", num(*base, 4)),
                    ("n", num(*tuned, 4)),
                    (delta_cls, text),
                ],
            ));
        }
        o.push_str("</table>\n");
    }
    if let Some(rr) = &r.reranker {
        o.push_str("<h2>Reranker</h2>\n");
        training_section(
            &mut o,
            &rr.losses,
            rr.pairs_per_sec,
            &rr.device,
            &rr.worker,
            &rr.placement,
        );
        rerank_table(&mut o, &rr.eval);
    }
    o.push_str("</body>\n</html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::charts::{interval_svg, loss_svg};
    use super::*;

    fn full() -> JobReport {
        let stage = |name: &str| StageReport {
            name: name.into(),
            state: "succeeded".into(),
            ran_on: "w1".into(),
            why: "only GPU".into(),
            seconds: Some(12.5),
            counts: BTreeMap::from([("chunks".to_string(), 40u64)]),
        };
        JobReport {
            job_id: "job-42".into(),
            state: "failed".into(),
            created: "2024-01-01T00:00:00Z".into(),
            corpus: "/data/<corpus>".into(),
            error: Some("boom & <script>".into()),
            stages: vec![stage("chunk"), stage("generate"), stage("train")],
            generation_by_worker: vec![WorkerShare {
                worker: "w1".into(),
                shards: 2,
                queries: 30,
                seconds: 4.0,
            }],
            losses: vec![(0, 2.0), (10, 1.5), (20, 0.9), (30, 0.7)],
            placement: vec![PlacementRow {
                worker: "w1".into(),
                device: "cuda:0".into(),
                estimate_secs: Some(360.0),
                chosen: true,
                note: String::new(),
            }],
            eval: vec![EvalDim {
                dim: 256,
                metrics: vec![("ndcg@10".into(), 0.5, 0.6), ("mrr".into(), 0.5, 0.4)],
            }],
            ..Default::default()
        }
    }

    fn polyline_points(html: &str) -> Vec<&str> {
        let start = html.find("<polyline").expect("polyline");
        let rest = &html[start..];
        let p = rest.find("points=\"").unwrap() + 8;
        let end = rest[p..].find('"').unwrap();
        rest[p..p + end].split_whitespace().collect()
    }

    fn comparison(verdict: &str, low: f64, high: f64) -> Comparison {
        let d = serde_json::json!({"base": 0.60, "tuned": 0.60 + (low + high) / 2.0,
            "delta": (low + high) / 2.0, "low": low, "high": high});
        serde_json::from_value(serde_json::json!({"queries": 103, "mrr_at_10": d,
            "ndcg_at_10": d, "verdict": verdict}))
        .unwrap()
    }

    #[test]
    fn the_verdict_is_drawn_with_its_intervals() {
        let mut r = full();
        r.verdict = Some(VerdictReport {
            judged_on: "your questions (/q/<set>)".into(),
            comparison: comparison("better", 0.01, 0.09),
            held_out: Some(comparison("no_measurable_change", -0.02, 0.04)),
            note: None,
            per_dim: vec![
                (384, comparison("better", 0.01, 0.09)),
                (64, comparison("no_measurable_change", -0.03, 0.02)),
            ],
        });
        r.stages[1].counts = BTreeMap::from([("queries".to_string(), 9u64)]);
        r.stages.push(StageReport {
            name: "prepare".into(),
            counts: BTreeMap::from([
                ("filter.kept".to_string(), 120u64),
                ("filter.dropped_round_trip".to_string(), 30),
                ("filter.dropped_too_short".to_string(), 45),
                ("split.test".to_string(), 20),
            ]),
            ..Default::default()
        });
        let html = render_html(&r);
        let v = html.find("<h2>Verdict</h2>").expect("a verdict section");
        assert!(
            v < html.find("<h2>Evaluation</h2>").unwrap(),
            "it comes first"
        );
        assert!(html
            .contains("<strong>better</strong> on your questions (/q/&lt;set&gt;) (103 queries"));
        assert!(html.contains("held-out generated queries (103 queries): no measurable change"));
        // Two charts of two rows: green bars above zero, grey ones spanning it, labelled.
        assert_eq!(
            html.matches("aria-label=\"change with 95% interval\"")
                .count(),
            2
        );
        let headline = &html[v..html.find("Per Matryoshka dimension").unwrap()];
        assert_eq!(headline.matches("fill=\"#1a7f37\"").count(), 2);
        assert_eq!(headline.matches("fill=\"#777\"").count(), 2);
        assert!(html.contains("+0.0500 [+0.0100 .. +0.0900]"), "{html}");
        // Per dimension: both metrics, base and fine-tuned of each width.
        assert!(html.contains("Per Matryoshka dimension"));
        assert!(html.contains("aria-label=\"MRR@10 per dimension\""));
        assert!(html.contains("aria-label=\"NDCG@10 per dimension\""));
        assert_eq!(html.matches(">dim 384</text>").count(), 2);
        assert_eq!(html.matches(">dim 64</text>").count(), 2);
        // The filter counts as bars, kept first then by count; other steps' counts left out.
        let bars = &html[html
            .find("<h2>Query filtering</h2>")
            .expect("a filter chart")..];
        let at = |s: &str| bars.find(&format!(">{s}</text>")).unwrap();
        assert!(
            at("kept") < at("dropped_too_short")
                && at("dropped_too_short") < at("dropped_round_trip")
        );
        assert!(!bars[..bars.find("</svg>").unwrap()].contains("split.test"));
        // Nothing finite to draw: a note, not a broken chart.
        let mut nan = comparison("better", 0.0, 0.1);
        nan.mrr_at_10.low = f64::NAN;
        assert!(interval_svg(&[("MRR@10", &nan.mrr_at_10)]).contains("no interval"));
    }

    #[test]
    fn escapes_html_specials() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(escape("plain ü"), "plain ü");
    }

    #[test]
    fn full_report_renders() {
        let html = render_html(&full());
        assert!(html.contains("job-42"));
        for s in ["chunk", "generate", "train"] {
            assert!(html.contains(&format!("<td>{s}</td>")));
        }
        assert!(html.contains("<svg"));
        assert_eq!(polyline_points(&html).len(), 4);
        assert!(html.contains("boom &amp; &lt;script&gt;"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("/data/&lt;corpus&gt;"));
        assert!(html.contains("chunks=40"));
        assert!(html.contains("6 min"));
        assert!(html.contains("100.0 %"));
        assert!(html.contains("class=\"chosen\""));
        assert!(!html.contains("NaN") && !html.contains("inf"));
    }

    #[test]
    fn empty_report_renders() {
        let html = render_html(&JobReport::default());
        assert!(html.contains("no training steps recorded"));
        assert!(!html.contains("<svg"));
        assert!(!html.contains("NaN") && !html.contains("inf"));
    }

    #[test]
    fn equal_losses_and_single_point_are_finite() {
        for losses in [vec![(0, 1.0f32), (5, 1.0), (9, 1.0)], vec![(3, 0.5)]] {
            let n = losses.len();
            let html = loss_svg(&losses);
            let pts = polyline_points(&html);
            assert_eq!(pts.len(), n);
            for p in pts {
                let (x, y) = p.split_once(',').unwrap();
                assert!(x.parse::<f64>().unwrap().is_finite());
                assert!(y.parse::<f64>().unwrap().is_finite());
            }
            assert!(!html.contains("NaN") && !html.contains("inf"));
        }
    }

    #[test]
    fn non_finite_losses_are_skipped() {
        let html = loss_svg(&[(0, 1.0), (1, f32::NAN), (2, f32::INFINITY), (3, 0.5)]);
        assert_eq!(polyline_points(&html).len(), 2);
        assert!(html.contains("2 non-finite"));
        assert!(!html.contains("NaN"));
    }

    #[test]
    fn delta_sign_and_class() {
        assert_eq!(delta(0.5, 0.6), ("+0.1000".to_string(), "pos"));
        assert_eq!(delta(0.5, 0.4), ("-0.1000".to_string(), "neg"));
        assert_eq!(delta(0.5, 0.5), ("0.0000".to_string(), ""));
        assert_eq!(delta(0.5, 0.500_001), ("0.0000".to_string(), ""));
        let html = render_html(&full());
        assert!(html.contains("<td class=\"n pos\">+0.1000</td>"));
        assert!(html.contains("<td class=\"n neg\">-0.1000</td>"));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_secs(Some(45.0)), "45 s");
        assert_eq!(human_secs(Some(360.0)), "6 min");
        assert_eq!(human_secs(Some(5400.0)), "1.5 h");
        assert_eq!(human_secs(None), "—");
        assert_eq!(human_secs(Some(f64::NAN)), "—");
    }
}
