//! The `ragd-worker train` and `ragd-worker evaluate` subcommands (one machine).

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use anyhow::Context as _;
use clap::Args;

use super::options::{interrupted, run_with_progress, EvaluateArgs, OptimArgs};
use ragd_engine::device::{self, DevicePref};
use ragd_engine::embed::{hub, SentenceEncoder};
use ragd_engine::eval::{self, beir, questions};
use ragd_engine::export::{export_model, RunRecord, TrainingMetadata};
use ragd_engine::train::{self, data, loss, TrainConfig};

/// Arguments of `ragd-worker train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training pairs, JSONL with `query`, `positive` and optional `negatives` (ragd F-058).
    #[arg(long)]
    pub data: PathBuf,
    /// Base model: a local sentence-transformers directory or a Hugging Face hub id.
    #[arg(long)]
    pub base_model: String,
    /// Output directory for the fine-tuned sentence-transformers model.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimisation settings.
    #[command(flatten)]
    pub optim: OptimArgs,
    /// MatryoshkaLoss dimensions, comma-separated, or `default` (384,256,128,64 cut to width).
    #[arg(long)]
    pub matryoshka_dims: Option<String>,
    /// GradCache mini-batch size: use CachedMultipleNegativesRankingLoss for big batches.
    #[arg(long)]
    pub cached_mini_batch: Option<usize>,
    /// False-negative control (GISTEmbedLoss semantics): the base model masks the in-batch and
    /// mined negatives it scores above the pair's positive less MARGIN (0 is GIST's default).
    #[arg(long, value_name = "MARGIN")]
    pub guide_margin: Option<f64>,
    /// MNRL both ways (MultipleNegativesSymmetricRankingLoss): each positive also picks its
    /// query among the batch's queries.
    #[arg(long)]
    pub symmetric_loss: bool,
    /// Optional BEIR test set: evaluate base and fine-tuned models after training.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Also write the rows, negatives filled, in the order training takes them (JSONL with
    /// `step` and `micro`), so a reference trainer can take the same batches
    /// (`scripts/st_train_pairs.py --batches FILE`).
    #[arg(long, value_name = "FILE")]
    pub batch_plan: Option<PathBuf>,
}

fn parse_dims(s: &str) -> anyhow::Result<Vec<usize>> {
    if s.trim() == "default" {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .with_context(|| format!("bad Matryoshka dim {d:?}"))
        })
        .collect()
}
/// Runs `ragd-worker train`: fine-tunes, exports a sentence-transformers directory with
/// training_metadata.json (and the LoRA adapter under OUT/adapter when training LoRA).
pub fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let dev = device::select(args.optim.device.parse::<DevicePref>()?)?;
    let model_dir = hub::resolve_model(&args.base_model)?;
    let mut encoder = SentenceEncoder::load_dir(&model_dir, &dev)?;
    let mut pairs = data::read_pairs(&args.data)?;
    let data_hash = data::file_hash(&args.data)?;
    let fill = data::uniform_negatives(&mut pairs, args.optim.seed);
    if fill.filled_pairs > 0 {
        eprintln!(
            "note: {} of {} pairs had fewer than {} negatives; filled them with {} random passages of the file",
            fill.filled_pairs,
            pairs.len(),
            fill.per_pair,
            fill.added
        );
    }
    let lora = args.optim.lora();
    let cfg = TrainConfig {
        matryoshka_dims: args
            .matryoshka_dims
            .as_deref()
            .map(parse_dims)
            .transpose()?,
        cached_mini_batch: args.cached_mini_batch,
        guide_margin: args.guide_margin,
        symmetric_loss: args.symmetric_loss,
        ..args.optim.train_config(&args.out, &TrainConfig::default())
    };
    if let Some(path) = &args.batch_plan {
        let plan = train::driver::plan_steps(&pairs, &cfg);
        let rows = train::driver::write_batch_plan(path, &pairs, &plan)?;
        eprintln!("wrote the batch plan ({rows} rows) to {}", path.display());
    }
    let started = SystemTime::now();
    let t0 = Instant::now();
    let (encoder, outcome, n_pairs) = {
        let cfg = cfg.clone();
        run_with_progress(move |cancel, tx| {
            let out = train::train(&mut encoder, &pairs, &cfg, cancel, Some(tx));
            out.map(|o| (encoder, o, pairs.len()))
        })??
    };
    if outcome.cancelled {
        return Err(interrupted(outcome.steps, &args.out, cfg.checkpoint_every));
    }
    let duration = t0.elapsed().as_secs_f64();
    let record = RunRecord {
        base_model: args.base_model.clone(),
        data_hash,
        started,
        device: device::describe(encoder.device()),
    };
    let mut meta =
        TrainingMetadata::of_run(&record, n_pairs, serde_json::to_value(&cfg)?, &outcome);
    if let Some(dir) = &args.eval_data {
        let data = beir::load(dir, false)?;
        let dims = loss::matryoshka_dims(None, encoder.dim())?;
        // Reloaded: a clone would share the weights that training updated in place.
        let base = SentenceEncoder::load_dir(&model_dir, &dev)?;
        let b = eval::evaluate(&base, &data, &dims, 64)?;
        let t = eval::evaluate(&encoder, &data, &dims, 64)?;
        println!("{}", eval::format_table(&t, Some(&b)));
        let comparison = eval::compare_widest(&b, &t);
        if let Some(c) = &comparison {
            println!("{c}");
        }
        meta.metrics["eval_base"] = serde_json::to_value(&b)?;
        meta.metrics["eval_tuned"] = serde_json::to_value(&t)?;
        meta.metrics["eval_comparison"] = serde_json::to_value(&comparison)?;
    }
    if let Some(l) = &lora {
        train::lora::save_adapter(
            encoder.bert(),
            l,
            &args.base_model,
            &args.out.join("adapter"),
        )?;
    }
    export_model(&encoder, &args.out, Some(&meta))?;
    println!(
        "fine-tuned {} steps in {:.1}s ({:.1} pairs/s), loss {:?} -> {:?}; model written to {}",
        outcome.steps,
        duration,
        outcome.pairs_per_sec,
        outcome.losses.first(),
        outcome.losses.last(),
        args.out.display()
    );
    Ok(())
}

/// One evaluated test set: the model (and the baseline) at every dimension, and the comparison.
struct Evaluated {
    tuned: Vec<eval::DimResult>,
    base: Option<Vec<eval::DimResult>>,
    comparison: Option<eval::compare::Comparison>,
    documents: usize,
}

impl Evaluated {
    fn run(
        model: &SentenceEncoder,
        baseline: Option<&SentenceEncoder>,
        data: &beir::BeirDataset,
        dims: &[usize],
        batch_size: usize,
    ) -> anyhow::Result<Self> {
        let tuned = eval::evaluate(model, data, dims, batch_size)?;
        let base = baseline
            .map(|b| eval::evaluate(b, data, dims, batch_size))
            .transpose()?;
        let comparison = base
            .as_deref()
            .and_then(|b| eval::compare_widest(b, &tuned));
        Ok(Self {
            tuned,
            base,
            comparison,
            documents: data.corpus.len(),
        })
    }

    fn print(&self, heading: &str) {
        println!(
            "{heading}: {} queries, {} documents",
            self.tuned.first().map_or(0, |r| r.metrics.queries),
            self.documents
        );
        println!("{}", eval::format_table(&self.tuned, self.base.as_deref()));
        if let Some(c) = &self.comparison {
            println!("{c}");
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"results": self.tuned, "baseline_results": self.base,
            "comparison": self.comparison})
    }
}

/// Runs `ragd-worker evaluate`: prints the metrics table (baseline side by side if given), on
/// the user's questions first when `--eval-queries` is given (they decide the verdict), then on
/// `--test-data`.
pub fn run_evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    if let Some(r) = &args.reranker {
        return super::rerank::run_evaluate_reranking(&args, r);
    }
    let held_out = args
        .test_data
        .as_deref()
        .map(|dir| beir::load(dir, args.titles))
        .transpose()?;
    let questions = match &args.eval_queries {
        Some(path) => {
            let corpus = held_out.as_ref().map(|d| d.corpus.as_slice());
            match questions::load(path, corpus) {
                Ok(resolved) => {
                    report_unmatched(path, &resolved.unmatched);
                    Some(resolved.data)
                }
                Err(e) => {
                    if let questions::QuestionsError::NoMatch { unmatched, .. } = &e {
                        report_unmatched(path, unmatched);
                    }
                    return Err(e.into());
                }
            }
        }
        None => None,
    };
    let dev = device::select(args.device.parse::<DevicePref>()?)?;
    let model = SentenceEncoder::load(&args.model, &dev)?;
    let baseline = args
        .baseline
        .as_deref()
        .map(|b| SentenceEncoder::load(b, &dev))
        .transpose()?;
    if let Some(b) = &baseline {
        let (m, bl) = (
            model.sentence_config().max_seq_length,
            b.sentence_config().max_seq_length,
        );
        if m != bl {
            eprintln!(
                "note: the model reads {m} tokens per text and the baseline {bl}: the change mixes \
                 fine-tuning with truncation (set max_seq_length in sentence_bert_config.json to \
                 compare at one length)"
            );
        }
    }
    let dims = match &args.dims {
        Some(d) => d.clone(),
        None => loss::matryoshka_dims(None, model.dim())?,
    };
    let mut json = serde_json::json!({"model": args.model, "baseline": args.baseline});
    let run = |data: &beir::BeirDataset| {
        Evaluated::run(&model, baseline.as_ref(), data, &dims, args.batch_size)
    };
    if let (Some(data), Some(path)) = (&questions, &args.eval_queries) {
        let e = run(data)?;
        e.print(&format!("Your questions ({})", path.display()));
        json["questions"] = e.json();
        json["comparison"] = serde_json::to_value(&e.comparison)?;
        if held_out.is_some() {
            println!();
        }
    }
    if let Some(data) = &held_out {
        if let Some(note) = args.test_data.as_deref().and_then(ict_note) {
            eprintln!("{note}");
        }
        let e = run(data)?;
        let heading = if questions.is_some() {
            "Test set (the verdict above is your questions')"
        } else {
            "Test set"
        };
        e.print(heading);
        let fields = e.json();
        json["results"] = fields["results"].clone();
        json["baseline_results"] = fields["baseline_results"].clone();
        if questions.is_none() {
            json["comparison"] = fields["comparison"].clone();
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A warning when `generate-data`'s manifest beside the test set says ICT wrote some of its
/// queries (sentences copied out of their chunks, which flatter the model): by the split step's
/// `test_ict` count, or by the generator in manifests written before it was counted.
fn ict_note(test_dir: &std::path::Path) -> Option<String> {
    let manifest = std::fs::read_to_string(test_dir.parent()?.join("manifest.json")).ok()?;
    let m: serde_json::Value = serde_json::from_str(&manifest).ok()?;
    let split = m["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s[0] == "split"))
        .map(|s| &s[1]["counts"]);
    let some = match split.and_then(|c| Some((c["test_ict"].as_u64()?, c["test"].as_u64()?))) {
        Some((0, _)) => return None,
        Some((ict, test)) if ict < test => "some of the",
        Some(_) => "the",
        None => match m["generator"].as_str()? {
            "ict" => "the",
            g if g.ends_with("+ict") => "some of the",
            _ => return None,
        },
    };
    Some(format!(
        "note: {some} test queries are ICT sentences copied out of their chunks; they overstate \
         gains. Judge by your own questions (--eval-queries FILE)."
    ))
}

/// Warns about relevant entries that matched no document, the first ten by name.
fn report_unmatched(path: &std::path::Path, unmatched: &[String]) {
    if unmatched.is_empty() {
        return;
    }
    eprintln!(
        "warning: {}: {} relevant entries match no document id or text of the corpus (questions with no match are left out):",
        path.display(),
        unmatched.len()
    );
    for u in unmatched.iter().take(10) {
        eprintln!("  {u}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_parse() {
        assert_eq!(parse_dims("default").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_dims("256, 64").unwrap(), vec![256, 64]);
        assert!(parse_dims("a").is_err());
    }

    #[test]
    fn the_ict_note_follows_the_test_sets_sources() {
        let tmp = tempfile::tempdir().unwrap();
        let test = tmp.path().join("test");
        let note = |manifest: serde_json::Value| {
            std::fs::write(tmp.path().join("manifest.json"), manifest.to_string()).unwrap();
            ict_note(&test)
        };
        let split = |llm: u64, ict: u64| {
            serde_json::json!({"generator": "builtin+ict", "steps": [
                ["filter", {"counts": {"kept": 9}}],
                ["split", {"counts": {"test": llm + ict, "test_llm": llm, "test_ict": ict}}]]})
        };
        assert_eq!(note(split(12, 0)), None, "LLM questions only");
        assert!(note(split(10, 2))
            .unwrap()
            .contains("some of the test queries"));
        assert!(note(split(0, 12))
            .unwrap()
            .contains("the test queries are ICT"));
        // Manifests from before the split counted sources: by the generator.
        let old = |g: &str| serde_json::json!({"generator": g, "steps": []});
        assert!(note(old("ict")).unwrap().contains("the test queries"));
        assert!(note(old("ollama+ict")).unwrap().contains("some of the"));
        assert_eq!(note(old("ollama")), None);
        assert!(
            note(serde_json::json!({"generator": "ict"})).is_some(),
            "no steps at all"
        );
        std::fs::remove_file(tmp.path().join("manifest.json")).unwrap();
        assert_eq!(ict_note(&test), None, "no manifest, no note");
    }
}
