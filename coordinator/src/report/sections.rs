//! The report's sections below the summary: the verdict with its intervals, the query filter's
//! counts, training (loss curve, Matryoshka dimensions) and the reranker's table.

use super::charts::*;
use super::html::*;
use super::{PlacementRow, StageReport, VerdictReport};
use ragd_engine::eval::compare::Comparison;

/// The verdict and its intervals, drawn.
pub(super) fn verdict_section(o: &mut String, v: &VerdictReport) {
    let c = &v.comparison;
    o.push_str("<h2>Verdict</h2>\n");
    o.push_str(&format!(
        "<p><strong>{}</strong> on {} ({} queries; paired bootstrap 95% intervals of the change, \
         fine-tuned minus base, at full width)</p>\n",
        escape(&c.verdict.to_string()),
        escape(&v.judged_on),
        c.queries
    ));
    o.push_str(&interval_svg(&[
        ("MRR@10", &c.mrr_at_10),
        ("NDCG@10", &c.ndcg_at_10),
    ]));
    if let Some(h) = &v.held_out {
        o.push_str(&format!(
            "<p>On the held-out generated queries ({} queries): {}</p>\n",
            h.queries,
            escape(&h.verdict.to_string())
        ));
        o.push_str(&interval_svg(&[
            ("MRR@10", &h.mrr_at_10),
            ("NDCG@10", &h.ndcg_at_10),
        ]));
    }
    if let Some(n) = &v.note {
        o.push_str(&format!("<p class=\"muted\">{}</p>\n", escape(n)));
    }
    if !v.per_dim.is_empty() {
        o.push_str(
            "<h3>Per Matryoshka dimension</h3>\n<p class=\"muted\">The same queries with the \
             embedding cut to each width: ○ base, ● fine-tuned, the bar where the fine-tuned \
             score lies by the 95% interval of the change.</p>\n",
        );
        for (metric, pick) in [
            (
                "MRR@10",
                (|c: &Comparison| &c.mrr_at_10) as fn(&Comparison) -> &_,
            ),
            ("NDCG@10", |c: &Comparison| &c.ndcg_at_10),
        ] {
            let rows: Vec<_> = v.per_dim.iter().map(|(d, c)| (*d, pick(c))).collect();
            o.push_str(&dims_svg(metric, &rows));
        }
    }
}

/// Generated queries kept and dropped per filter reason (the prepare stage's `filter.*`
/// counts), as bars: kept first, then the reasons by count.
pub(super) fn filter_section(o: &mut String, stages: &[StageReport]) {
    let Some(prepare) = stages.iter().find(|s| s.name == "prepare") else {
        return;
    };
    let mut rows: Vec<(String, u64)> = prepare
        .counts
        .iter()
        .filter_map(|(k, n)| Some((k.strip_prefix("filter.")?.to_string(), *n)))
        .collect();
    if rows.is_empty() {
        return;
    }
    rows.sort_by(|a, b| (b.0 == "kept").cmp(&(a.0 == "kept")).then(b.1.cmp(&a.1)));
    o.push_str("<h2>Query filtering</h2>\n<p>Generated queries kept, and dropped per reason</p>\n");
    o.push_str(&bars_svg("queries per filter reason", &rows, &["kept"]));
}

/// Loss curve, speed, device, worker and placement table of one training run.
pub(super) fn training_section(
    o: &mut String,
    losses: &[(usize, f32)],
    pairs_per_sec: Option<f64>,
    device: &Option<String>,
    worker: &Option<String>,
    placement: &[PlacementRow],
) {
    o.push_str(&loss_svg(losses));
    let opt = |v: &Option<String>| escape(v.as_deref().unwrap_or("—"));
    let pps = pairs_per_sec.map_or_else(|| "—".into(), |v| num(v, 1));
    o.push_str(&format!(
        "<dl>\n<dt>Pairs/s</dt><dd>{pps}</dd>\n<dt>Device</dt><dd>{}</dd>\n\
         <dt>Worker</dt><dd>{}</dd>\n</dl>\n",
        opt(device),
        opt(worker),
    ));
    if !placement.is_empty() {
        o.push_str("<h3>Placement</h3>\n");
        o.push_str(&table_head(&["", "Worker", "Device", "Estimate", "Note"]));
        for p in placement {
            let (cls, mark) = if p.chosen {
                ("chosen", "✔")
            } else {
                ("", "")
            };
            o.push_str(&table_row(
                cls,
                &[
                    ("", mark.into()),
                    ("", escape(&p.worker)),
                    ("", escape(&p.device)),
                    ("n", human_secs(p.estimate_secs)),
                    ("", escape(&p.note)),
                ],
            ));
        }
        o.push_str("</table>\n");
    }
}

/// The reranking table: one row per pipeline (embedder alone first), deltas against it.
pub(super) fn rerank_table(o: &mut String, rows: &[ragd_engine::rerank::eval::RerankMetrics]) {
    let Some(first) = rows.first() else {
        o.push_str("<p class=\"muted\">no reranking evaluation recorded</p>\n");
        return;
    };
    o.push_str(&format!(
        "<h3>Reranking the top {} of {} held-out queries</h3>\n",
        first.depth, first.queries
    ));
    o.push_str(&table_head(&[
        "Pipeline",
        "MRR@10",
        "NDCG@10",
        "Recall@1",
        "Recall@5",
        "Recall@10",
        "Pairs/s",
    ]));
    for r in rows {
        let cell = |v: f64, base: f64| {
            let (d, cls) = delta(base, v);
            let cls = match cls {
                "pos" => "n pos",
                "neg" => "n neg",
                _ => "n",
            };
            (cls, format!("{} ({d})", num(v, 4)))
        };
        let recall = |m: &ragd_engine::rerank::eval::RerankMetrics, k| {
            m.recall.get(&k).copied().unwrap_or(0.0)
        };
        o.push_str(&table_row(
            "",
            &[
                ("", escape(&r.name)),
                cell(r.mrr_at_10, first.mrr_at_10),
                cell(r.ndcg_at_10, first.ndcg_at_10),
                cell(recall(r, 1), recall(first, 1)),
                cell(recall(r, 5), recall(first, 5)),
                cell(recall(r, 10), recall(first, 10)),
                (
                    "n",
                    r.pairs_per_sec.map_or_else(|| "—".into(), |p| num(p, 1)),
                ),
            ],
        ));
    }
    o.push_str("</table>\n");
}
