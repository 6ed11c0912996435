//! The job's HTML report: gathers what `jobs.db` holds about a job into a [`JobReport`].

use super::local::{self, EvalOutput};
use super::service::JobService;
use super::train::TrainKind;
use super::JobError;
use super::JobSpec;
use crate::report::{
    self, EvalDim, JobReport, RerankerReport, StageReport, VerdictReport, WorkerShare,
};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

impl JobService {
    /// Writes the job's HTML report next to its model and in its job directory.
    pub fn write_report(&self, id: &str) -> Result<PathBuf, JobError> {
        let v = self.show_json(id)?;
        let db = &self.ctx.db;
        let spec: JobSpec = serde_json::from_value(v["spec"].clone()).unwrap_or_default();
        let stages = db.stages(id)?;
        let out_of = |name: &str| -> Value {
            stages
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.output.as_deref())
                .and_then(|o| serde_json::from_str(o).ok())
                .unwrap_or(Value::Null)
        };
        let mut counts: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
        for name in ["ingest", "prepare"] {
            if let Some(steps) = out_of(name)["steps"].as_array() {
                for step in steps {
                    let step_name = step[0].as_str().unwrap_or_default();
                    let c: BTreeMap<String, u64> =
                        serde_json::from_value(step[1]["counts"].clone()).unwrap_or_default();
                    counts
                        .entry(name.to_string())
                        .or_default()
                        .extend(c.into_iter().map(|(k, n)| (format!("{step_name}.{k}"), n)));
                }
            }
        }
        let gen = out_of("generate");
        if let Some(q) = gen["queries"].as_u64() {
            let e = counts.entry("generate".into()).or_default();
            e.insert("queries".into(), q);
            e.insert(
                "shards_set_aside".into(),
                gen["set_aside"].as_u64().unwrap_or(0),
            );
        }
        let train = out_of("train");
        let eval: Option<EvalOutput> = serde_json::from_value(out_of("evaluate")).ok();
        let report = JobReport {
            job_id: id.to_string(),
            state: v["state"].as_str().unwrap_or_default().to_string(),
            created: v["created"].as_str().unwrap_or_default().to_string(),
            finished: Some(v["updated"].as_str().unwrap_or_default().to_string()),
            corpus: spec.corpus.display().to_string(),
            base_model: spec.base_model.display().to_string(),
            llm: gen["llm"].as_str().unwrap_or(&spec.llm).to_string(),
            error: v["error"].as_str().map(String::from),
            stages: stages
                .iter()
                .map(|s| StageReport {
                    name: s.name.clone(),
                    state: s.state.clone(),
                    ran_on: s.ran_on.clone().unwrap_or_default(),
                    why: s.why.clone().unwrap_or_default(),
                    seconds: s
                        .started_ms
                        .zip(s.finished_ms)
                        .map(|(a, b)| b.saturating_sub(a) as f64 / 1000.0),
                    counts: counts.get(&s.name).cloned().unwrap_or_default(),
                })
                .collect(),
            generation_by_worker: v["generation_by_worker"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|w| WorkerShare {
                            worker: w["worker"].as_str().unwrap_or_default().into(),
                            shards: w["shards"].as_u64().unwrap_or(0),
                            queries: w["queries"].as_u64().unwrap_or(0),
                            seconds: w["seconds"].as_f64().unwrap_or(0.0),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            losses: db.losses(id)?,
            pairs_per_sec: train["pairs_per_sec"].as_f64(),
            training_device: train["device"].as_str().map(String::from),
            training_worker: train["worker"].as_str().map(String::from),
            placement: serde_json::from_value(train["placement"].clone()).unwrap_or_default(),
            eval: eval.as_ref().map(eval_dims).unwrap_or_default(),
            verdict: eval.as_ref().and_then(|e| verdict_report(e, &spec)),
            reranker: (!out_of("train_reranker").is_null()).then(|| {
                let t = out_of("train_reranker");
                RerankerReport {
                    losses: db
                        .losses(&TrainKind::Reranker.series(id))
                        .unwrap_or_default(),
                    pairs_per_sec: t["pairs_per_sec"].as_f64(),
                    device: t["device"].as_str().map(String::from),
                    worker: t["worker"].as_str().map(String::from),
                    placement: serde_json::from_value(t["placement"].clone()).unwrap_or_default(),
                    eval: eval.map(|e| e.rerank).unwrap_or_default(),
                }
            }),
        };
        let html = report::render_html(&report);
        let dir = local::job_dir(&self.ctx, id);
        let io = |p: &std::path::Path, e: std::io::Error| {
            JobError::stage("export", format!("{}: {e}", p.display()))
        };
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let path = dir.join("report.html");
        std::fs::write(&path, &html).map_err(|e| io(&path, e))?;
        for key in ["model_path", "reranker_path"] {
            if let Some(model) = v[key].as_str() {
                let p = PathBuf::from(model).join("report.html");
                let _ = std::fs::write(&p, &html);
            }
        }
        Ok(path)
    }
}

/// Per-dimension (metric, base, tuned) rows for the report.
pub fn eval_dims(e: &EvalOutput) -> Vec<EvalDim> {
    e.tuned
        .iter()
        .zip(&e.base)
        .map(|(t, b)| {
            let mut metrics = Vec::new();
            for (name, k) in [
                ("mrr", 10),
                ("ndcg", 10),
                ("map", 100),
                ("recall", 1),
                ("recall", 5),
                ("recall", 10),
                ("accuracy", 1),
                ("accuracy", 3),
                ("accuracy", 5),
                ("accuracy", 10),
            ] {
                let get = |m: &ragd_engine::eval::metrics::IrMetrics| {
                    let map = match name {
                        "mrr" => &m.mrr,
                        "ndcg" => &m.ndcg,
                        "map" => &m.map,
                        "recall" => &m.recall,
                        _ => &m.accuracy,
                    };
                    map.get(&k).copied()
                };
                if let (Some(bv), Some(tv)) = (get(&b.metrics), get(&t.metrics)) {
                    metrics.push((format!("{name}@{k}"), bv, tv));
                }
            }
            EvalDim {
                dim: t.dim,
                metrics,
            }
        })
        .collect()
}

/// The report's verdict: on the user's questions when they were used, else on the held-out
/// queries (flagged when ICT wrote them).
fn verdict_report(e: &EvalOutput, spec: &JobSpec) -> Option<VerdictReport> {
    let comparison = e.comparison.clone()?;
    let questions = e.questions.as_ref().filter(|q| q.error.is_none());
    let judged_on = match questions {
        Some(q) => format!("your questions ({})", q.source.display()),
        None => "the held-out generated queries".to_string(),
    };
    let note = (questions.is_none() && (e.held_out_all_ict || spec.llm == "ict")).then(|| {
        "The held-out queries are ICT sentences copied out of their chunks: they overstate \
         gains. Judge by your own questions (ragd-coord submit --eval-queries FILE)."
            .to_string()
    });
    Some(VerdictReport {
        judged_on,
        comparison,
        held_out: e.held_out_comparison.clone(),
        note,
        per_dim: e.per_dim.clone(),
    })
}
