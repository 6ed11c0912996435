//! The optimisation loop shared by every trainer (embedders, rerankers): step plan, gradient
//! accumulation, clipping, AdamW with the warmup/decay schedule, checkpoints and resume, progress
//! events and cancellation. A trainer supplies its variables and a function that returns the
//! loss and gradients of one micro-batch.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Tensor, Var};
use tokio::sync::mpsc::UnboundedSender;

use super::data::{DataError, TrainPair};
use super::optim::{self, AdamW, LinearSchedule};
use super::{checkpoint, sampler, StepProgress, TrainConfig, TrainError, TrainEvent, TrainOutcome};
use crate::rng::Rng;

/// One optimiser step's worth of micro-batches (indices into the examples) and its epoch.
#[derive(Debug, Clone)]
pub struct StepPlan {
    /// Epoch of the step (0-based).
    pub epoch: usize,
    /// Micro-batches accumulated into the step.
    pub micro: Vec<Vec<usize>>,
}

/// Every step of a run: per epoch, batches with no repeated text (seeded by `cfg.seed` and the
/// epoch), grouped `grad_accum` to a step, cut at `max_steps`.
pub fn plan_steps(pairs: &[TrainPair], cfg: &TrainConfig) -> Vec<StepPlan> {
    let mut steps = Vec::new();
    for epoch in 0..cfg.epochs {
        let mut rng = Rng::new(cfg.seed.wrapping_add(0x5EED_0000 + epoch as u64));
        let batches = sampler::no_duplicate_batches(pairs, cfg.batch_size, &mut rng, false);
        for chunk in batches.chunks(cfg.grad_accum.max(1)) {
            steps.push(StepPlan {
                epoch,
                micro: chunk.to_vec(),
            });
        }
    }
    if let Some(max) = cfg.max_steps {
        steps.truncate(max);
    }
    steps
}

/// Writes the rows of `pairs` in the order `plan` trains on them (JSONL: `step` and `micro`,
/// the optimiser step and micro-batch, then `query`, `positive`, `negatives`), so that a
/// reference trainer can take the very same batches; returns the rows written.
pub fn write_batch_plan(
    path: &Path,
    pairs: &[TrainPair],
    plan: &[StepPlan],
) -> Result<usize, DataError> {
    use std::io::Write as _;
    let err = |source| DataError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
    let mut rows = 0;
    for (step, s) in plan.iter().enumerate() {
        for (micro, batch) in s.micro.iter().enumerate() {
            for &i in batch {
                let p = &pairs[i];
                let row = serde_json::json!({
                    "step": step,
                    "micro": micro,
                    "query": p.query,
                    "positive": p.positive,
                    "negatives": p.negatives,
                });
                writeln!(out, "{row}").map_err(err)?;
                rows += 1;
            }
        }
    }
    out.flush().map_err(err)?;
    Ok(rows)
}

/// What one run optimises.
pub struct StepRun<'a> {
    /// The variables, in the order the gradient function returns gradients.
    pub vars: &'a [(String, Var)],
    /// Learning-rate multiplier per variable (all 1 when `None`).
    pub lr_scales: Option<Vec<f64>>,
    /// The steps.
    pub plan: &'a [StepPlan],
    /// Optimiser, schedule, clipping and checkpoint settings.
    pub cfg: &'a TrainConfig,
    /// Settings a resumed run must share with the checkpoint's run.
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Number of training examples (reported when the run starts).
    pub examples: usize,
    /// Scored texts or pairs per example (for the pairs/s figure).
    pub pairs_per_example: usize,
}

fn send(progress: Option<&UnboundedSender<TrainEvent>>, ev: TrainEvent) {
    if let Some(p) = progress {
        // A dropped receiver only means nobody is watching.
        let _ = p.send(ev);
    }
}

/// Runs the plan (from the checkpoint in `cfg.resume_from`, if any). `grads_of` returns the loss
/// and per-variable gradients of one micro-batch (indices into the examples), given the dropout
/// RNG when dropout is on. Checks `cancel` before every step; reports [`TrainEvent`]s.
pub fn run_steps(
    run: StepRun<'_>,
    cancel: &AtomicBool,
    progress: Option<&UnboundedSender<TrainEvent>>,
    mut grads_of: impl FnMut(
        &[usize],
        Option<&mut Rng>,
    ) -> Result<(f32, Vec<Option<Tensor>>), TrainError>,
) -> Result<TrainOutcome, TrainError> {
    let StepRun {
        vars,
        lr_scales,
        plan,
        cfg,
        settings,
        examples,
        pairs_per_example,
    } = run;
    let _memory = crate::alloc::ReuseFreedMemory::hold();
    let mut opt = AdamW::new(vars, cfg.adamw.clone())?;
    if let Some(scales) = lr_scales {
        opt.set_lr_scales(scales)?;
    }
    let total = plan.len();
    let schedule = LinearSchedule::with_ratio(cfg.lr, cfg.warmup_ratio, total);
    let mut rng = Rng::new(cfg.seed ^ 0xD50_0000);
    let mut losses = Vec::with_capacity(total);
    let mut start = 0;
    if let Some(path) = &cfg.resume_from {
        let st = checkpoint::load(path, vars, &mut opt, &settings)?;
        start = st.step;
        rng = st.rng;
        losses = st.losses;
    }
    send(
        progress,
        TrainEvent::Started {
            total_steps: total,
            start_step: start,
            pairs: examples,
        },
    );
    tracing::info!(
        total_steps = total,
        start_step = start,
        examples,
        trainable = vars.len(),
        "training started"
    );
    let t0 = Instant::now();
    let mut pairs_done = 0usize;
    let mut cancelled = false;
    for (step, sp) in plan.iter().enumerate().skip(start) {
        if cancel.load(Ordering::Relaxed) {
            tracing::info!(step, "training cancelled");
            cancelled = true;
            break;
        }
        let n_micro = sp.micro.len() as f64;
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut step_loss = 0f32;
        for mb in &sp.micro {
            let drop_rng = if cfg.dropout { Some(&mut rng) } else { None };
            let (l, grads) = grads_of(mb, drop_rng)?;
            step_loss += l / n_micro as f32;
            for (slot, g) in acc.iter_mut().zip(grads) {
                if let Some(g) = g {
                    let g = (g / n_micro)?;
                    *slot = Some(match slot.take() {
                        Some(s) => (s + g)?,
                        None => g,
                    });
                }
            }
            pairs_done += mb.len() * pairs_per_example;
        }
        let grad_norm = optim::clip_grad_norm(&mut acc, cfg.max_grad_norm)?;
        let lr = schedule.lr(step);
        opt.step(vars, &acc, lr)?;
        losses.push(step_loss);
        let done = step + 1;
        let elapsed = t0.elapsed().as_secs_f64();
        let per_step = elapsed / (done - start) as f64;
        send(
            progress,
            TrainEvent::Step(StepProgress {
                step: done,
                total_steps: total,
                epoch: sp.epoch,
                loss: step_loss,
                lr,
                grad_norm,
                pairs_per_sec: pairs_done as f64 / elapsed.max(1e-9),
                eta: Duration::from_secs_f64(per_step * (total - done) as f64),
            }),
        );
        tracing::debug!(step = done, loss = step_loss, lr, grad_norm, "step");
        if let (Some(every), Some(dir)) = (cfg.checkpoint_every, &cfg.checkpoint_dir) {
            if every > 0 && done % every == 0 && done < total {
                let st = checkpoint::CheckpointState {
                    step: done,
                    rng: rng.clone(),
                    losses: losses.clone(),
                    settings: settings.clone(),
                };
                let path = checkpoint::save(dir, vars, &opt, &st)?;
                send(progress, TrainEvent::Checkpoint { step: done, path });
            }
        }
    }
    let elapsed = t0.elapsed();
    Ok(TrainOutcome {
        steps: losses.len(),
        pairs_per_sec: pairs_done as f64 / elapsed.as_secs_f64().max(1e-9),
        losses,
        cancelled,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data;

    #[test]
    fn the_batch_plan_lists_every_row_in_training_order() {
        let pairs: Vec<TrainPair> = (0..5)
            .map(|i| TrainPair {
                query: format!("q{i}"),
                positive: format!("p{i}"),
                negatives: vec![format!("n{i}")],
            })
            .collect();
        let cfg = crate::train::TrainConfig {
            batch_size: 2,
            epochs: 2,
            ..Default::default()
        };
        let plan = plan_steps(&pairs, &cfg);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.jsonl");
        assert_eq!(write_batch_plan(&path, &pairs, &plan).unwrap(), 10);
        let text = std::fs::read_to_string(&path).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let expected: Vec<(usize, usize, usize)> = plan
            .iter()
            .enumerate()
            .flat_map(|(s, p)| {
                p.micro
                    .iter()
                    .enumerate()
                    .flat_map(move |(m, b)| b.iter().map(move |&i| (s, m, i)))
            })
            .collect();
        assert_eq!(rows.len(), expected.len());
        for (row, (step, micro, i)) in rows.iter().zip(&expected) {
            assert_eq!(row["step"], *step);
            assert_eq!(row["micro"], *micro);
            assert_eq!(row["query"], pairs[*i].query);
            assert_eq!(row["negatives"][0], pairs[*i].negatives[0]);
        }
        // Each epoch holds every pair once; the file reads back as training pairs.
        let back = data::read_pairs(&path).unwrap();
        let mut first: Vec<&str> = back[..5].iter().map(|p| p.query.as_str()).collect();
        first.sort_unstable();
        assert_eq!(first, ["q0", "q1", "q2", "q3", "q4"]);
    }
}
