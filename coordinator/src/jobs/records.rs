//! What jobs leave behind besides their stages and tasks: training losses, calibrations per
//! worker and model, the newest checkpoint brought home, and the model registry (`jobs.db`).

use super::db::{JobDb, JobDbError, ModelRow};
use crate::store::now_ms;
use rusqlite::{params, OptionalExtension};

impl JobDb {
    /// Records training losses.
    pub fn add_losses(&self, job: &str, losses: &[(u64, f32)]) -> Result<(), JobDbError> {
        let (job, losses) = (job.to_string(), losses.to_vec());
        self.write(move |c| {
            for (step, loss) in losses {
                c.execute(
                    "INSERT OR REPLACE INTO losses (job_id, step, loss) VALUES (?1, ?2, ?3)",
                    params![job, step as i64, loss as f64],
                )?;
            }
            Ok(())
        })
    }

    /// The job's training losses by step.
    pub fn losses(&self, job: &str) -> Result<Vec<(usize, f32)>, JobDbError> {
        self.read(|c| {
            let mut st =
                c.prepare("SELECT step, loss FROM losses WHERE job_id = ?1 ORDER BY step")?;
            let rows = st.query_map([job], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get::<_, f64>(1)? as f32))
            })?;
            rows.collect()
        })
    }

    /// A cached calibration: (device, pairs/s).
    pub fn calibration(
        &self,
        worker: &str,
        model: &str,
    ) -> Result<Option<(String, f64)>, JobDbError> {
        self.read(|c| {
            c.query_row(
                "SELECT device, pairs_per_sec FROM calibrations WHERE worker = ?1 AND model = ?2",
                params![worker, model],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    /// Caches a calibration.
    pub fn set_calibration(
        &self,
        worker: &str,
        model: &str,
        device: &str,
        pairs_per_sec: f64,
    ) -> Result<(), JobDbError> {
        let (worker, model, device) = (worker.to_string(), model.to_string(), device.to_string());
        self.write(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO calibrations (worker, model, device, pairs_per_sec, measured_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![worker, model, device, pairs_per_sec, now_ms() as i64],
            )
            .map(|_| ())
        })
    }

    /// Records the newest checkpoint brought home for a job.
    pub fn set_checkpoint(
        &self,
        job: &str,
        step: u64,
        bundle: &str,
        worker: &str,
    ) -> Result<(), JobDbError> {
        let (job, bundle, worker) = (job.to_string(), bundle.to_string(), worker.to_string());
        self.write(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO checkpoints (job_id, step, bundle, worker) VALUES (?1, ?2, ?3, ?4)",
                params![job, step as i64, bundle, worker],
            )
            .map(|_| ())
        })
    }

    /// The newest checkpoint of a job: (step, bundle hex).
    pub fn checkpoint(&self, job: &str) -> Result<Option<(u64, String)>, JobDbError> {
        self.read(|c| {
            c.query_row(
                "SELECT step, bundle FROM checkpoints WHERE job_id = ?1",
                [job],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
        })
    }

    /// Registers a model of `kind` (`embedder` or `reranker`), not active.
    pub fn add_model(
        &self,
        id: &str,
        kind: &str,
        path: &str,
        eval: &str,
    ) -> Result<(), JobDbError> {
        let (id, kind, path, eval) = (
            id.to_string(),
            kind.to_string(),
            path.to_string(),
            eval.to_string(),
        );
        self.write(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO models (id, kind, path, eval, active, created_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                params![id, kind, path, eval, now_ms() as i64],
            )
            .map(|_| ())
        })
    }

    /// Every registered model, newest first.
    pub fn models(&self) -> Result<Vec<ModelRow>, JobDbError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT id, path, eval, active, created_ms, promoted_ms, kind FROM models ORDER BY created_ms DESC",
            )?;
            let rows = st.query_map([], |r| {
                Ok(ModelRow {
                    kind: r.get(6)?,
                    id: r.get(0)?,
                    path: r.get(1)?,
                    eval: r.get(2)?,
                    active: r.get::<_, i64>(3)? != 0,
                    created_ms: r.get::<_, i64>(4)? as u64,
                    promoted_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                })
            })?;
            rows.collect()
        })
    }

    /// Makes `id` the only active model of its kind (one transaction).
    pub fn promote(&self, id: &str) -> Result<(), JobDbError> {
        let id = id.to_string();
        self.write(move |c| {
            c.execute(
                "UPDATE models SET active = 0 WHERE kind = (SELECT kind FROM models WHERE id = ?1)",
                params![id],
            )?;
            c.execute(
                "UPDATE models SET active = 1, promoted_ms = ?2 WHERE id = ?1",
                params![id, now_ms() as i64],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_promotes_one_model_and_records_checkpoints_and_calibrations() {
        let tmp = tempfile::tempdir().unwrap();
        let db = JobDb::open(tmp.path()).unwrap();
        db.add_model("a", "embedder", "/m/a", "{}").unwrap();
        db.add_model("b", "embedder", "/m/b", "{}").unwrap();
        db.add_model("r", "reranker", "/m/r", "{}").unwrap();
        db.promote("r").unwrap();
        db.promote("a").unwrap();
        db.promote("b").unwrap();
        let mut active: Vec<String> = db
            .models()
            .unwrap()
            .into_iter()
            .filter(|m| m.active)
            .map(|m| m.id)
            .collect();
        active.sort();
        assert_eq!(active, vec!["b".to_string(), "r".to_string()]);
        db.set_checkpoint("j", 10, "aa", "w1").unwrap();
        db.set_checkpoint("j", 20, "bb", "w2").unwrap();
        assert_eq!(db.checkpoint("j").unwrap(), Some((20, "bb".into())));
        db.set_calibration("w1", "m", "cpu", 12.5).unwrap();
        assert_eq!(
            db.calibration("w1", "m").unwrap(),
            Some(("cpu".into(), 12.5))
        );
        db.add_losses("j", &[(2, 0.5), (1, 0.9), (2, 0.4)]).unwrap();
        assert_eq!(db.losses("j").unwrap(), vec![(1, 0.9), (2, 0.4)]);
    }
}
