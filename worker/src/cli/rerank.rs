//! The `ragd-worker train-reranker`, `ragd-worker rerank` and `ragd-worker evaluate --reranker`
//! commands (one machine).

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use anyhow::Context as _;
use clap::Args;

use super::options::{interrupted, run_with_progress, EvaluateArgs, OptimArgs};
use ragd_engine::device::{self, DevicePref};
use ragd_engine::embed::{hub, SentenceEncoder};
use ragd_engine::eval::{self, beir};
use ragd_engine::export::{RunRecord, TrainingMetadata};
use ragd_engine::rerank::eval as rerank_eval;
use ragd_engine::rerank::export::export_reranker;
use ragd_engine::rerank::loss::RerankLoss;
use ragd_engine::rerank::train::{train_reranker, RerankTrainConfig};
use ragd_engine::rerank::{CrossEncoder, HeadOrigin};
use ragd_engine::train::data;

/// Arguments of `ragd-worker train-reranker`.
#[derive(Debug, Args)]
pub struct TrainRerankerArgs {
    /// Training rows, JSONL with `query`, `positive` and `negatives` (ragd F-058, as
    /// `generate-data` writes them with mined hard negatives).
    #[arg(long)]
    pub data: PathBuf,
    /// Base model: a cross-encoder (BertForSequenceClassification, one label) or an encoder,
    /// which gets a new head; a local directory or a Hugging Face hub id.
    #[arg(long)]
    pub base_model: String,
    /// Output directory for the fine-tuned cross-encoder.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimisation settings (as `train`).
    #[command(flatten)]
    pub optim: OptimArgs,
    /// Loss: bce (BinaryCrossEntropyLoss), mnrl (MultipleNegativesRankingLoss) or lambda
    /// (LambdaLoss, NDCG-Loss2++).
    #[arg(long, default_value = "bce")]
    pub loss: String,
    /// Hard negatives per query (the first N of each row; default: all, equal in every row).
    #[arg(long)]
    pub negatives: Option<usize>,
    /// BCE weight of positives (default: negatives per positive).
    #[arg(long)]
    pub pos_weight: Option<f64>,
    /// MNRL: passages of other queries scored per query.
    #[arg(long, default_value_t = 4)]
    pub in_batch_negatives: usize,
    /// LambdaLoss: only pairs touching the top K predicted ranks count.
    #[arg(long)]
    pub lambda_k: Option<usize>,
    /// Learning-rate multiplier for a newly initialised head.
    #[arg(long, default_value_t = RerankTrainConfig::default().new_head_lr_scale)]
    pub new_head_lr_scale: f64,
    /// Optional BEIR test set: after training, rerank `--eval-embedder`'s top `--depth` with the
    /// base (when it is a cross-encoder) and the fine-tuned reranker.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// First-stage embedder for `--eval-data` (directory or hub id).
    #[arg(long)]
    pub eval_embedder: Option<String>,
    /// Candidates per query reranked in the evaluation.
    #[arg(long, default_value_t = 100)]
    pub depth: usize,
}

impl TrainRerankerArgs {
    /// The reranker settings these arguments describe.
    pub fn config(&self) -> anyhow::Result<RerankTrainConfig> {
        let mut loss = RerankLoss::from_name(&self.loss)
            .with_context(|| format!("unknown --loss {:?}: use bce, mnrl or lambda", self.loss))?;
        match &mut loss {
            RerankLoss::Bce { pos_weight } => *pos_weight = self.pos_weight,
            RerankLoss::Mnrl {
                in_batch_negatives, ..
            } => *in_batch_negatives = self.in_batch_negatives,
            RerankLoss::Lambda { k, .. } => *k = self.lambda_k,
        }
        Ok(RerankTrainConfig {
            train: self
                .optim
                .train_config(&self.out, &RerankTrainConfig::default().train),
            loss,
            negatives: self.negatives,
            new_head_lr_scale: self.new_head_lr_scale,
        })
    }
}

/// Runs `ragd-worker train-reranker`: fine-tunes and exports a cross-encoder directory with
/// training_metadata.json.
pub fn run_train_reranker(args: TrainRerankerArgs) -> anyhow::Result<()> {
    if args.eval_data.is_some() && args.eval_embedder.is_none() {
        anyhow::bail!(
            "--eval-data needs --eval-embedder: the embedder whose top candidates are reranked"
        );
    }
    let dev = device::select(args.optim.device.parse::<DevicePref>()?)?;
    let model_dir = hub::resolve_model(&args.base_model)?;
    let cfg = args.config()?;
    let mut model = CrossEncoder::load_dir(&model_dir, &dev, cfg.train.seed)?;
    eprintln!(
        "base {}: head {:?}, max {} tokens per pair",
        model_dir.display(),
        model.head().origin(),
        model.max_len()
    );
    let pairs = data::read_pairs(&args.data)?;
    let data_hash = data::file_hash(&args.data)?;
    let started = SystemTime::now();
    let t0 = Instant::now();
    let (model, outcome, n_rows) = {
        let cfg = cfg.clone();
        run_with_progress(move |cancel, tx| {
            let out = train_reranker(&mut model, &pairs, &cfg, cancel, Some(tx));
            out.map(|o| (model, o, pairs.len()))
        })??
    };
    if outcome.cancelled {
        return Err(interrupted(
            outcome.steps,
            &args.out,
            cfg.train.checkpoint_every,
        ));
    }
    let duration = t0.elapsed().as_secs_f64();
    let record = RunRecord {
        base_model: args.base_model.clone(),
        data_hash,
        started,
        device: device::describe(model.device()),
    };
    let mut meta = TrainingMetadata::of_run(&record, n_rows, serde_json::to_value(&cfg)?, &outcome);
    if let (Some(dir), Some(embedder)) = (&args.eval_data, &args.eval_embedder) {
        let data = beir::load(dir, false)?;
        let embedder = SentenceEncoder::load(embedder, &dev)?;
        let candidates = eval::retrieve(&embedder, &data, args.depth, 64)?;
        // Reloaded: the trained model changed the weights in place.
        let base = CrossEncoder::load_dir(&model_dir, &dev, cfg.train.seed)?;
        let mut rerankers = vec![("fine-tuned reranker", &model)];
        if base.head().origin() == HeadOrigin::Loaded {
            rerankers.insert(0, ("base reranker", &base));
        }
        let results = rerank_eval::evaluate_pipelines(&data, &candidates, &rerankers, 32)?;
        println!("{}", rerank_eval::format_table(&results));
        meta.metrics["rerank_eval"] = serde_json::to_value(&results)?;
    }
    export_reranker(&model, &args.out, Some(&meta))?;
    println!(
        "fine-tuned reranker {} steps in {:.1}s ({:.1} pairs/s), loss {:?} -> {:?}; written to {}",
        outcome.steps,
        duration,
        outcome.pairs_per_sec,
        outcome.losses.first(),
        outcome.losses.last(),
        args.out.display()
    );
    Ok(())
}

/// Arguments of `ragd-worker rerank`.
#[derive(Debug, Args)]
pub struct RerankArgs {
    /// The cross-encoder (directory or hub id).
    #[arg(long)]
    pub model: String,
    /// The query.
    #[arg(long)]
    pub query: String,
    /// Documents to rank: a text file with one document per line (`-` reads stdin).
    #[arg(long)]
    pub docs: PathBuf,
    /// Print only the best N.
    #[arg(long)]
    pub top: Option<usize>,
    /// Pairs per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print JSON (`{"query", "results": [{"index", "score", "logit", "text"}]}`) instead of a
    /// table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ragd-worker rerank`: scores every document against the query and prints them best
/// first.
pub fn run_rerank(args: RerankArgs) -> anyhow::Result<()> {
    let dev = device::select(args.device.parse::<DevicePref>()?)?;
    let model = load_trained(&args.model, &dev)?;
    let text = if args.docs.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading documents from stdin")?
    } else {
        std::fs::read_to_string(&args.docs)
            .with_context(|| format!("reading documents from {}", args.docs.display()))?
    };
    let docs: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if docs.is_empty() {
        anyhow::bail!("{}: no documents (one per line)", args.docs.display());
    }
    let pairs: Vec<(&str, &str)> = docs.iter().map(|d| (args.query.as_str(), *d)).collect();
    let logits = model.predict(&pairs, args.batch_size)?;
    let act = model.head().activation();
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.truncate(args.top.unwrap_or(docs.len()));
    if args.json {
        let results: Vec<serde_json::Value> = order
            .iter()
            .map(|&i| {
                serde_json::json!({"index": i, "score": act.apply(logits[i]),
                    "logit": logits[i], "text": docs[i]})
            })
            .collect();
        let v = serde_json::json!({"query": args.query, "results": results});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{:>4}  {:>8}  {:>5}  document", "rank", "score", "line");
        for (rank, &i) in order.iter().enumerate() {
            let mut d: String = docs[i].chars().take(100).collect();
            if d.len() < docs[i].len() {
                d.push('…');
            }
            println!(
                "{:>4}  {:>8.4}  {:>5}  {d}",
                rank + 1,
                act.apply(logits[i]),
                i + 1
            );
        }
    }
    Ok(())
}

/// `ragd-worker evaluate --reranker`: the embedder (`--model`) alone, with the baseline
/// reranker and with the reranker, on the test set.
pub fn run_evaluate_reranking(args: &EvaluateArgs, reranker: &str) -> anyhow::Result<()> {
    let dev = device::select(args.device.parse::<DevicePref>()?)?;
    let Some(test_data) = &args.test_data else {
        anyhow::bail!("--reranker evaluates on --test-data: give the BEIR test set to rerank");
    };
    let data = beir::load(test_data, args.titles)?;
    let embedder = SentenceEncoder::load(&args.model, &dev)?;
    let candidates = eval::retrieve(&embedder, &data, args.depth, args.batch_size)?;
    let tuned = load_trained(reranker, &dev)?;
    let base = args
        .baseline_reranker
        .as_deref()
        .map(|b| load_trained(b, &dev))
        .transpose()?;
    let mut rerankers: Vec<(&str, &CrossEncoder)> = Vec::new();
    if let Some(b) = &base {
        rerankers.push(("base reranker", b));
    }
    rerankers.push(("reranker", &tuned));
    let results = rerank_eval::evaluate_pipelines(&data, &candidates, &rerankers, 32)?;
    println!("{}", rerank_eval::format_table(&results));
    if let Some(path) = &args.json {
        let v = serde_json::json!({"embedder": args.model, "reranker": reranker,
            "baseline_reranker": args.baseline_reranker, "results": results});
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Loads a cross-encoder that must already have a trained head (scoring with a new random head
/// would print meaningless numbers).
fn load_trained(spec: &str, dev: &candle_core::Device) -> anyhow::Result<CrossEncoder> {
    let model = CrossEncoder::load(spec, dev, 0)?;
    if model.head().origin() != HeadOrigin::Loaded {
        anyhow::bail!(
            "{spec} has no trained reranker head (it is a plain encoder): train one with \
             `ragd-worker train-reranker --base-model {spec}`"
        );
    }
    Ok(model)
}
