//! What the CLI sees of jobs and models: job lists and details, logs, the model registry
//! (promote / rollback with their quality gates).

use super::db::JobRow;
use super::generate::ShardOutput;
use super::service::JobService;
use super::JobError;
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn fmt_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

impl JobService {
    /// Every job as JSON (newest first).
    pub fn list_json(&self) -> Result<Value, JobError> {
        let jobs = self.ctx.db.jobs()?;
        Ok(Value::Array(jobs.iter().map(|j| self.summary(j)).collect()))
    }

    fn summary(&self, j: &JobRow) -> Value {
        let spec: Value = serde_json::from_str(&j.spec).unwrap_or(Value::Null);
        let stage = self
            .ctx
            .db
            .stages(&j.id)
            .ok()
            .and_then(|s| s.into_iter().find(|s| s.state != "done").map(|s| s.name));
        json!({
            "id": j.id, "state": j.state, "created": fmt_ms(j.created_ms),
            "updated": fmt_ms(j.updated_ms), "error": j.error,
            "corpus": spec["corpus"], "stage": stage,
        })
    }

    /// One job in detail as JSON: stages, shards per worker, training, evaluation, log tail.
    pub fn show_json(&self, id: &str) -> Result<Value, JobError> {
        let db = &self.ctx.db;
        let job = db.job(id)?;
        let stages = db.stages(id)?;
        let mut per_worker: BTreeMap<String, (u64, u64, f64)> = BTreeMap::new();
        for t in db.tasks(id, "generate")? {
            if let (Some(w), Some(out)) = (&t.done_by, &t.output) {
                let q = serde_json::from_str::<ShardOutput>(out)
                    .map_or(0, |s| s.questions.len() as u64);
                let e = per_worker.entry(w.clone()).or_default();
                e.0 += 1;
                e.1 += q;
                e.2 += t.seconds.unwrap_or(0.0);
            }
        }
        let mut embedded: BTreeMap<String, (u64, u64, f64)> = BTreeMap::new();
        for t in db.tasks(id, "embed")? {
            if let (Some(w), Some(out)) = (&t.done_by, &t.output) {
                let rows = serde_json::from_str::<Value>(out)
                    .ok()
                    .and_then(|v| v["rows"].as_u64())
                    .unwrap_or(0);
                let e = embedded.entry(w.clone()).or_default();
                e.0 += 1;
                e.1 += rows;
                e.2 += t.seconds.unwrap_or(0.0);
            }
        }
        let tasks: BTreeMap<String, BTreeMap<String, u64>> =
            ["generate", "embed", "train", "train_reranker"]
                .iter()
                .map(|s| {
                    (
                        s.to_string(),
                        db.task_counts(id, s)
                            .unwrap_or_default()
                            .into_iter()
                            .collect(),
                    )
                })
                .collect();
        let events = db.events(id, 0)?;
        let tail: Vec<String> = events
            .iter()
            .rev()
            .take(8)
            .rev()
            .map(|(_, ts, m)| format!("{} {m}", fmt_ms(*ts)))
            .collect();
        let mut v = self.summary(&job);
        v["spec"] = serde_json::from_str(&job.spec).unwrap_or(Value::Null);
        v["stages"] = json!(stages.iter().map(|s| json!({
            "name": s.name, "state": s.state, "ran_on": s.ran_on, "why": s.why,
            "seconds": s.started_ms.zip(s.finished_ms).map(|(a, b)| (b.saturating_sub(a)) as f64 / 1000.0),
        })).collect::<Vec<_>>());
        v["generation_by_worker"] = json!(per_worker
            .iter()
            .map(
                |(w, (s, q, secs))| json!({"worker": w, "shards": s, "queries": q, "seconds": secs})
            )
            .collect::<Vec<_>>());
        v["embedding_by_worker"] = json!(embedded
            .iter()
            .map(|(w, (s, t, secs))| json!({"worker": w, "shards": s, "texts": t, "seconds": secs}))
            .collect::<Vec<_>>());
        v["tasks"] = json!(tasks);
        v["live"] = json!(self
            .ctx
            .live_lines(id)
            .into_iter()
            .map(|(_, l)| l)
            .collect::<Vec<_>>());
        v["checkpoint"] = json!(db.checkpoint(id)?.map(|(s, _)| s));
        v["events"] = json!(tail);
        let output = |name: &str| {
            stages
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.output.as_deref())
                .and_then(|o| serde_json::from_str::<Value>(o).ok())
        };
        for (stage, key) in [
            ("train", "training"),
            ("train_reranker", "reranker_training"),
        ] {
            if let Some(t) = output(stage) {
                v[key] = json!({"worker": t["worker"], "device": t["device"], "steps": t["steps"],
                    "pairs_per_sec": t["pairs_per_sec"], "placement": t["placement"]});
            }
        }
        if let Some(e) = output("evaluate") {
            v["evaluation"] = e;
        }
        if let Some(x) = output("export") {
            v["model_path"] = x["path"].clone();
            v["reranker_path"] = x["reranker_path"].clone();
        }
        Ok(v)
    }

    /// The job's log after `after` as (seq, line) pairs.
    pub fn logs(&self, id: &str, after: i64) -> Result<Vec<(i64, String)>, JobError> {
        self.ctx.db.job(id)?;
        Ok(self
            .ctx
            .db
            .events(id, after)?
            .into_iter()
            .map(|(seq, ts, m)| (seq, format!("{} {m}", fmt_ms(ts))))
            .collect())
    }

    /// The registered models as JSON.
    pub fn models_json(&self) -> Result<Value, JobError> {
        Ok(json!(self
            .ctx
            .db
            .models()?
            .iter()
            .map(|m| {
                let eval: Value = serde_json::from_str(&m.eval).unwrap_or(Value::Null);
                let (tuned, base) = quality(&m.kind, &eval);
                json!({"id": m.id, "kind": m.kind, "path": m.path, "active": m.active,
                   "created": fmt_ms(m.created_ms), "ndcg@10": tuned, "base_ndcg@10": base})
            })
            .collect::<Vec<_>>()))
    }

    /// Promotes a model (the active one of its kind); refused unless `force` when it evaluates
    /// worse than its base, or for a reranker, when reranking does not beat the embedder alone
    /// (and the base reranker, if there was one).
    pub fn promote(&self, id: &str, force: bool) -> Result<String, String> {
        let models = self.ctx.db.models().map_err(|e| e.to_string())?;
        let Some(m) = models.iter().find(|m| m.id == id) else {
            return Err(format!(
                "no model {id:?}; `ragd-coord models list` shows them"
            ));
        };
        if !force {
            if let Some(refusal) = promotion_refusal(id, &m.kind, &m.eval) {
                return Err(refusal);
            }
        }
        self.ctx.db.promote(id).map_err(|e| e.to_string())?;
        Ok(m.path.clone())
    }

    /// Re-promotes the model of `kind` promoted before the current one.
    pub fn rollback(&self, kind: &str) -> Result<String, String> {
        let mut models = self.ctx.db.models().map_err(|e| e.to_string())?;
        models.retain(|m| m.promoted_ms.is_some() && m.kind == kind);
        models.sort_by_key(|m| std::cmp::Reverse(m.promoted_ms));
        let Some(previous) = models.iter().find(|m| !m.active) else {
            return Err(format!("no earlier promoted {kind} to roll back to"));
        };
        self.ctx
            .db
            .promote(&previous.id)
            .map_err(|e| e.to_string())?;
        Ok(previous.id.clone())
    }
}

/// Why a model may not be promoted without `--force`: it evaluates worse than its base (an
/// embedder), or reranking with it does not beat the embedder alone and the base reranker.
/// `None` when it may (or when its evaluation has no figures to judge by).
fn promotion_refusal(id: &str, kind: &str, eval_json: &str) -> Option<String> {
    let eval: Value = serde_json::from_str(eval_json).unwrap_or(Value::Null);
    // An embedder evaluated with intervals: only a measurable gain is promoted, and not one
    // measured on ICT sentences alone (they were copied out of the chunks the model trained on
    // and flatter it: engine/TRAINING.md has runs where they said "better" and real questions
    // did not).
    if let Some(verdict) = eval["comparison"]["verdict"].as_str() {
        let own_questions = eval["questions"].is_object() && eval["questions"]["error"].is_null();
        if verdict == "better" && !own_questions && eval["held_out_all_ict"] == true {
            return Some(format!(
                "model {id} was judged better only on held-out ICT sentences, copied out of the \
                 chunks it trained on, which overstate gains; judge it on your own questions \
                 (`ragd-coord submit --eval-queries FILE`) or use --force to promote it anyway"
            ));
        }
        if verdict == "better" {
            return None;
        }
        let d = &eval["comparison"]["ndcg_at_10"];
        return Some(format!(
            "model {id} is not measurably better than its base ({}: NDCG@10 {:+.4}, 95% CI {:+.4} .. {:+.4}); use --force to promote it anyway",
            verdict.replace('_', " "),
            d["delta"].as_f64().unwrap_or(f64::NAN),
            d["low"].as_f64().unwrap_or(f64::NAN),
            d["high"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    let (t, b) = match quality(kind, &eval) {
        (Some(t), Some(b)) => (t, b),
        _ => return None,
    };
    let (worse, than) = if kind == "reranker" {
        (t <= b, "the embedder alone (or the base reranker)")
    } else {
        (t < b, "its base")
    };
    worse.then(|| {
        format!(
            "model {id} does not beat {than} (NDCG@10 {t:.4} vs {b:.4}); use --force to promote it anyway"
        )
    })
}

fn ndcg10(results: &Value) -> Option<f64> {
    results
        .as_array()?
        .first()
        .and_then(|r| r["metrics"]["ndcg"]["10"].as_f64())
}

/// (tuned, reference) NDCG@10 of a registered model: an embedder against its base; a reranker
/// (its last reranking row) against the best of the embedder alone and the base reranker.
fn quality(kind: &str, eval: &Value) -> (Option<f64>, Option<f64>) {
    if kind == "reranker" {
        let rows: Vec<f64> = eval["rerank"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["ndcg_at_10"].as_f64())
            .collect();
        match rows.split_last() {
            Some((t, rest)) if !rest.is_empty() => {
                (Some(*t), rest.iter().copied().reduce(f64::max))
            }
            _ => (None, None),
        }
    } else {
        (ndcg10(&eval["tuned"]), ndcg10(&eval["base"]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedder_eval(tuned: f64, base: f64) -> String {
        let row = |v: f64| json!([{"metrics": {"ndcg": {"10": v}}}]);
        json!({"tuned": row(tuned), "base": row(base)}).to_string()
    }

    #[test]
    fn a_worse_model_is_refused_without_force() {
        let refusal = promotion_refusal("j1", "embedder", &embedder_eval(0.40, 0.45))
            .expect("a worse embedder is refused");
        assert!(
            refusal.contains("--force") && refusal.contains("0.4000 vs 0.4500"),
            "{refusal}"
        );
        assert_eq!(
            promotion_refusal("j1", "embedder", &embedder_eval(0.50, 0.45)),
            None
        );
        // A reranker must beat the best of the rows before it, a tie is not enough.
        let rerank = |rows: &[f64]| {
            json!({"rerank": rows.iter().map(|v| json!({"ndcg_at_10": v})).collect::<Vec<_>>()})
                .to_string()
        };
        assert!(promotion_refusal("r", "reranker", &rerank(&[0.5, 0.6, 0.6])).is_some());
        assert!(promotion_refusal("r", "reranker", &rerank(&[0.5, 0.4])).is_some());
        assert_eq!(
            promotion_refusal("r", "reranker", &rerank(&[0.5, 0.55])),
            None
        );
        // With intervals, the verdict decides: a higher mean that is not measurably better is
        // refused too.
        let with = |verdict: &str| {
            let mut v: Value = serde_json::from_str(&embedder_eval(0.50, 0.45)).unwrap();
            v["comparison"] = json!({"verdict": verdict,
                "ndcg_at_10": {"delta": 0.05, "low": -0.01, "high": 0.11}});
            v.to_string()
        };
        let refusal = promotion_refusal("j2", "embedder", &with("no_measurable_change"))
            .expect("no measurable change is refused");
        assert!(
            refusal.contains("not measurably better") && refusal.contains("--force"),
            "{refusal}"
        );
        assert!(promotion_refusal("j2", "embedder", &with("worse")).is_some());
        assert_eq!(promotion_refusal("j2", "embedder", &with("better")), None);
        // No figures: nothing to judge by.
        assert_eq!(promotion_refusal("x", "embedder", "{}"), None);
    }

    #[test]
    fn better_on_ict_sentences_alone_is_not_enough() {
        let eval = |all_ict: bool, questions: Value| {
            json!({"comparison": {"verdict": "better"}, "held_out_all_ict": all_ict,
                "questions": questions})
            .to_string()
        };
        let refusal = promotion_refusal("j3", "embedder", &eval(true, Value::Null))
            .expect("a verdict on ICT sentences alone is refused");
        assert!(
            refusal.contains("ICT") && refusal.contains("--eval-queries"),
            "{refusal}"
        );
        // LLM-written held-out queries, or the user's own questions, decide as before.
        assert_eq!(
            promotion_refusal("j3", "embedder", &eval(false, Value::Null)),
            None
        );
        let own = json!({"source": "q.jsonl", "error": null});
        assert_eq!(promotion_refusal("j3", "embedder", &eval(true, own)), None);
        // Questions that could not be used leave the ICT verdict as the headline.
        let unusable = json!({"source": "q.jsonl", "error": "no question matched"});
        assert!(promotion_refusal("j3", "embedder", &eval(true, unusable)).is_some());
    }
}
