//! Options and helpers the one-machine training commands share: the optimisation options
//! (`train`, `train-reranker`), the evaluation options (`evaluate`, `evaluate --reranker`), the
//! progress display and the Ctrl-C handling of a run.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use ragd_engine::train::{self, lora::LoraConfig, TrainConfig, TrainEvent};

/// A finite number above zero (`f64`'s parser also takes "NaN" and "inf", which would train
/// NaN weights).
fn positive_number(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number (e.g. 2e-5)")),
    }
}

/// Optimisation options shared by `train` and `train-reranker`.
#[derive(Debug, Args)]
pub struct OptimArgs {
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Examples per batch (default: 16 pairs for `train`, 16 queries for `train-reranker`).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate (default: 2e-5 for `train`, 1e-4 for `train-reranker`).
    #[arg(long, value_parser = positive_number)]
    pub lr: Option<f64>,
    /// Fraction of steps used for linear warmup.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    /// AdamW weight decay (not applied to biases and layer norms).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Batches accumulated per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Maximum tokens per text while training (per pair for rerankers; default: the model's).
    /// A speed setting: the exported model reads the base model's length.
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Random seed (batch order, dropout, adapter and head init).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Turn dropout off while training.
    #[arg(long)]
    pub no_dropout: bool,
    /// Stop after this many optimiser steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Write a checkpoint to OUT/checkpoints every N steps.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Resume from a checkpoint directory (same settings as the original run).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Train LoRA adapters of this rank instead of all weights.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// LoRA target modules, comma-separated.
    #[arg(long, default_value = "query,value", value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// Device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl OptimArgs {
    /// The LoRA settings, when `--lora-r` is given.
    pub fn lora(&self) -> Option<LoraConfig> {
        self.lora_r.map(|r| LoraConfig {
            r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.lora_targets.clone(),
        })
    }

    /// The shared training settings over `defaults` (the command's own batch size and learning
    /// rate), checkpoints under `out/checkpoints`.
    pub fn train_config(&self, out: &Path, defaults: &TrainConfig) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            lr: self.lr.unwrap_or(defaults.lr),
            warmup_ratio: self.warmup_ratio,
            adamw: train::optim::AdamWConfig {
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            max_grad_norm: self.max_grad_norm,
            grad_accum: self.grad_accum,
            seed: self.seed,
            max_seq_len: self.max_seq_len,
            dropout: !self.no_dropout,
            max_steps: self.max_steps,
            checkpoint_every: self.checkpoint_every,
            checkpoint_dir: self.checkpoint_every.map(|_| out.join("checkpoints")),
            resume_from: self.resume.clone(),
            lora: self.lora(),
            ..TrainConfig::default()
        }
    }
}

/// Arguments of `ragd-worker evaluate`.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// The model to evaluate (directory or hub id).
    #[arg(long)]
    pub model: String,
    /// A baseline model shown side by side (for example the base model).
    #[arg(long)]
    pub baseline: Option<String>,
    /// BEIR-layout test set (corpus.jsonl, queries.jsonl, qrels/test.tsv), for example the
    /// held-out set `generate-data` writes.
    #[arg(long, required_unless_present = "eval_queries")]
    pub test_data: Option<PathBuf>,
    /// Your own questions: a BEIR directory, or JSONL lines `{"query", "relevant": [chunk ids
    /// or passages]}` judged against `--test-data`'s corpus. They are the headline and decide
    /// the verdict.
    #[arg(long)]
    pub eval_queries: Option<PathBuf>,
    /// Dimensions, comma-separated (default: Matryoshka defaults cut to the model width).
    #[arg(long, value_delimiter = ',')]
    pub dims: Option<Vec<usize>>,
    /// Prefix corpus texts with their titles (BEIR convention).
    #[arg(long)]
    pub titles: bool,
    /// Encoding batch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Evaluate this cross-encoder reranking `--model`'s top `--depth` candidates instead.
    #[arg(long)]
    pub reranker: Option<String>,
    /// A baseline cross-encoder shown beside `--reranker`.
    #[arg(long, requires = "reranker")]
    pub baseline_reranker: Option<String>,
    /// Candidates per query that the reranker reorders.
    #[arg(long, default_value_t = 100)]
    pub depth: usize,
}
/// The progress display of one training event (`None`: nothing to show).
pub fn progress_line(ev: &TrainEvent) -> Option<String> {
    match ev {
        TrainEvent::Started {
            total_steps,
            start_step,
            pairs,
        } => Some(format!(
            "training {pairs} pairs, {total_steps} steps (starting at {start_step})\n"
        )),
        TrainEvent::Step(p) => {
            let width = 30;
            let filled = width * p.step / p.total_steps.max(1);
            Some(format!(
                "\r[{}{}] {}/{} epoch {} loss {:.4} lr {:.2e} {:.1} pairs/s ETA {}   ",
                "#".repeat(filled),
                ".".repeat(width - filled),
                p.step,
                p.total_steps,
                p.epoch + 1,
                p.loss,
                p.lr,
                p.pairs_per_sec,
                humantime::format_duration(std::time::Duration::from_secs(p.eta.as_secs()))
            ))
        }
        TrainEvent::Checkpoint { step, path } => {
            Some(format!("\ncheckpoint at step {step}: {}\n", path.display()))
        }
    }
}

/// Runs `job` on a thread of its own with a cancellation flag and a progress channel, drawing
/// its [`TrainEvent`]s on stderr until it ends; returns its result. The first Ctrl-C sets the
/// flag (the run stops before its next step), a second one exits at once.
pub fn run_with_progress<T: Send + 'static>(
    job: impl FnOnce(&AtomicBool, &tokio::sync::mpsc::UnboundedSender<TrainEvent>) -> T + Send + 'static,
) -> anyhow::Result<T> {
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let flag = cancel.clone();
    let worker = std::thread::spawn(move || job(&flag, &tx));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the progress loop")?;
    runtime.block_on(async {
        let mut stderr = std::io::stderr();
        let mut interrupted = false;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    if let Some(line) = progress_line(&ev) {
                        let _ = write!(stderr, "{line}");
                        let _ = stderr.flush();
                    }
                }
                _ = tokio::signal::ctrl_c() => {
                    if interrupted {
                        eprintln!("\ninterrupted twice: exiting without waiting");
                        std::process::exit(130);
                    }
                    interrupted = true;
                    cancel.store(true, Ordering::Relaxed);
                    eprintln!("\ninterrupted: stopping after the current step (Ctrl-C again to quit now)");
                }
            }
        }
    });
    eprintln!();
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("training thread panicked"))
}

/// The error a run stopped by Ctrl-C ends with: where its checkpoints are and how to resume.
pub fn interrupted(steps: usize, out: &Path, checkpoint_every: Option<usize>) -> anyhow::Error {
    let dir = out.join("checkpoints");
    let last = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .max_by_key(|(step, _)| *step);
    match (checkpoint_every, last) {
        (Some(_), Some((step, path))) => anyhow::anyhow!(
            "interrupted after {steps} steps; nothing exported. Resume from step {step} with the \
             same command plus --resume {}",
            path.display()
        ),
        _ => anyhow::anyhow!(
            "interrupted after {steps} steps; nothing exported and no checkpoint written (pass \
             --checkpoint-every N to be able to resume)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rates_must_be_positive_numbers() {
        assert_eq!(positive_number("2e-5"), Ok(2e-5));
        for bad in ["NaN", "inf", "0", "-1e-5", "fast"] {
            let err = positive_number(bad).unwrap_err();
            assert!(err.contains("positive number"), "{bad}: {err}");
        }
    }

    #[test]
    fn progress_line_shows_step_loss_rate_eta() {
        let ev = TrainEvent::Step(train::StepProgress {
            step: 5,
            total_steps: 10,
            epoch: 0,
            loss: 0.5,
            lr: 1e-5,
            grad_norm: 1.0,
            pairs_per_sec: 12.5,
            eta: std::time::Duration::from_secs(65),
        });
        let line = progress_line(&ev).unwrap();
        assert!(line.contains("5/10") && line.contains("0.5000") && line.contains("12.5 pairs/s"));
        assert!(line.contains("1m 5s"), "{line}");
    }
}
