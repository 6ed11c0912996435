//! Training and inference throughput of this engine against sentence-transformers on the same
//! machine in the same run (all-MiniLM-L6-v2, batch 32), over the matrix the speed issue asks for:
//! training at max length 128 and 256, with no negative and with one negative per pair, and
//! inference at 128 and 256.
//!
//! `cargo run --release -p ragd-engine --example bench_train -- MODEL_DIR [BEIR_DIR] [PYTHON]`
//!
//! BEIR_DIR (default `../shared/data/debfaq`) supplies texts: (title, text) pairs for training
//! (the next pair's passage is the negative) and the passages for inference. PYTHON (default
//! `python3`) runs `scripts/bench_train_reference.py`; pass `none` to skip the reference.
//! Every case runs in a fresh process on each side, so each peak RSS is its own. Both sides
//! train on the same batches in the same order (the order ragd's sampler draws) and report the
//! median of BENCH_STEPS (default 6) timed steps after 2 warm-up steps; inference is the median
//! of 3 passes over every passage. BENCH_CASES (default `128:0,128:1,256:0,256:1`) picks the
//! training cases as LENGTH:NEGATIVES (empty: inference only); threads are the usual
//! RAYON_NUM_THREADS / torch count. After the table, each inference length's rate is set against
//! the rate of one large product on each side (see `print_product_bound`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context as _;

#[path = "common/reference.rs"]
mod reference;
use candle_core::{Device, Tensor};
use ragd_engine::device::peak_rss_bytes;
use ragd_engine::embed::config::BertConfig;
use ragd_engine::embed::SentenceEncoder;
use ragd_engine::train::data::TrainPair;
use ragd_engine::train::{driver, train, TrainConfig, TrainEvent};

const BATCH: usize = 32;
const WARMUP: usize = 2;
const INFER_LENS: [usize; 2] = [128, 256];
const INFER_PASSES: usize = 3;

/// A (title, text) pair of the corpus.
type TitledText = (String, String);

/// (title, text) pairs and all passages of a BEIR corpus.
fn load_texts(dir: &Path) -> anyhow::Result<(Vec<TitledText>, Vec<String>)> {
    let corpus = std::fs::read_to_string(dir.join("corpus.jsonl"))
        .with_context(|| format!("{}: need a BEIR corpus.jsonl", dir.display()))?;
    let mut pairs = Vec::new();
    let mut passages = Vec::new();
    for line in corpus.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let text = v["text"].as_str().unwrap_or_default().to_string();
        let title = v["title"].as_str().unwrap_or_default().to_string();
        if !title.is_empty() && !text.is_empty() {
            pairs.push((title, text.clone()));
        }
        passages.push(text);
    }
    Ok((pairs, passages))
}

/// Training pairs with `negatives` negatives each: the passages of the pairs that follow.
fn with_negatives(raw: &[TitledText], negatives: usize) -> Vec<TrainPair> {
    (0..raw.len())
        .map(|i| TrainPair {
            query: raw[i].0.clone(),
            positive: raw[i].1.clone(),
            negatives: (1..=negatives)
                .map(|k| raw[(i + k) % raw.len()].1.clone())
                .collect(),
        })
        .collect()
}

fn config(max_len: usize, steps: usize, pairs: usize) -> TrainConfig {
    let total = steps + WARMUP;
    TrainConfig {
        batch_size: BATCH,
        max_seq_len: Some(max_len),
        max_steps: Some(total),
        epochs: 1 + total * BATCH / pairs.max(1),
        ..TrainConfig::default()
    }
}

fn write_pairs(path: &Path, pairs: impl Iterator<Item = TrainPair>) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for p in pairs {
        let row =
            serde_json::json!({"query": p.query, "positive": p.positive, "negatives": p.negatives});
        writeln!(f, "{row}")?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Child process: one training case; prints `{"pairs_per_s", "peak_rss_bytes"}`.
fn child_train(
    model: &Path,
    pairs_path: &Path,
    max_len: usize,
    steps: usize,
) -> anyhow::Result<()> {
    let pairs = ragd_engine::train::data::read_pairs(pairs_path)?;
    let mut enc = SentenceEncoder::load_dir(model, &Device::Cpu)?;
    let cfg = config(max_len, steps, pairs.len());
    let plan = driver::plan_steps(&pairs, &cfg);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    train(&mut enc, &pairs, &cfg, &AtomicBool::new(false), Some(&tx))?;
    // Each event carries pairs/s since the start; with the plan's batch sizes that gives the
    // elapsed time at every step, and so each step's own time.
    let mut done = 0usize;
    let mut elapsed = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let TrainEvent::Step(p) = ev {
            done += plan[p.step - 1].micro.iter().map(Vec::len).sum::<usize>();
            elapsed.push(done as f64 / p.pairs_per_sec);
        }
    }
    let step_secs: Vec<f64> = elapsed
        .windows(2)
        .skip(WARMUP - 1)
        .map(|w| w[1] - w[0])
        .collect();
    anyhow::ensure!(
        step_secs.len() == steps,
        "expected {steps} timed steps, got {}",
        step_secs.len()
    );
    let out = serde_json::json!({
        "pairs_per_s": BATCH as f64 / median(step_secs),
        "peak_rss_bytes": peak_rss_bytes().unwrap_or(0),
    });
    println!("{out}");
    Ok(())
}

/// FLOPs of one encoder pass over a sequence of `len` tokens: each layer's products (Q, K, V,
/// output, the two feed-forward ones) and attention's two (scores, weighted values). Embeddings,
/// norms, activations and pooling are left out: they are a few percent of the work.
fn encoder_flops(cfg: &BertConfig, len: usize) -> f64 {
    let (h, i, l) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        len as f64,
    );
    cfg.num_hidden_layers as f64 * (2.0 * l * (4.0 * h * h + 2.0 * h * i) + 4.0 * l * l * h)
}

/// The best rate of a 4096 x 4096 f32 product through Candle (the `gemm` crate this engine's
/// products use), in GFLOP/s: how fast this machine multiplies at all, for comparing a pass's
/// rate against.
fn gemm_gflops() -> anyhow::Result<f64> {
    const N: usize = 4096;
    let a = Tensor::randn(0f32, 1.0, (N, N), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (N, N), &Device::Cpu)?;
    a.matmul(&b)?;
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        a.matmul(&b)?;
        best = best.max(2.0 * (N as f64).powi(3) / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}

/// Child process: inference at one length; prints `{"texts_per_s", "peak_rss_bytes",
/// "flop_per_pass", "tokens_per_pass", "gemm_gflops"}`.
fn child_infer(model: &Path, passages_path: &Path, max_len: usize) -> anyhow::Result<()> {
    let passages: Vec<String> = std::fs::read_to_string(passages_path)?
        .lines()
        .map(|l| {
            Ok(serde_json::from_str::<serde_json::Value>(l)?["text"]
                .as_str()
                .unwrap_or_default()
                .to_string())
        })
        .collect::<anyhow::Result<_>>()?;
    let mut enc = SentenceEncoder::load_dir(model, &Device::Cpu)?;
    enc.set_max_seq_length(max_len)?;
    let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
    enc.encode(&refs[..64.min(refs.len())], BATCH)?;
    let mut rates = Vec::new();
    for _ in 0..INFER_PASSES {
        let t = Instant::now();
        enc.encode(&refs, BATCH)?;
        rates.push(refs.len() as f64 / t.elapsed().as_secs_f64());
    }
    let peak_rss = peak_rss_bytes().unwrap_or(0);
    let (mut flop, mut tokens) = (0f64, 0usize);
    for p in &refs {
        let len = enc
            .tokenize(&[p])?
            .attention_mask
            .sum_all()?
            .to_scalar::<f32>()? as usize;
        flop += encoder_flops(enc.bert().config(), len);
        tokens += len;
    }
    let out = serde_json::json!({
        "texts_per_s": median(rates),
        "peak_rss_bytes": peak_rss,
        "flop_per_pass": flop,
        "tokens_per_pass": tokens,
        "gemm_gflops": gemm_gflops()?,
    });
    println!("{out}");
    Ok(())
}

/// Prints how much of the machine's product rate a pass reached on each side, and the ratio
/// that leaves: inference is nearly all products, so where both sides run them near the rate of
/// a large product, no lever outside the products can lift the ratio above that bound.
fn print_product_bound(
    len: usize,
    texts: usize,
    ours: &serde_json::Value,
    theirs: &serde_json::Value,
) {
    let flop = ours["flop_per_pass"].as_f64().unwrap_or(f64::NAN);
    let rate = |v: &serde_json::Value| {
        flop * v["texts_per_s"].as_f64().unwrap_or(f64::NAN) / texts as f64 / 1e9
    };
    let (a, b) = (rate(ours), rate(theirs));
    let pa = ours["gemm_gflops"].as_f64().unwrap_or(f64::NAN);
    let pb = theirs["gemm_gflops"].as_f64().unwrap_or(f64::NAN);
    println!(
        "inference at {len}: {:.2} TFLOP of products per pass ({} tokens); ragd {a:.0} GFLOP/s \
         ({:.0}% of a 4096x4096 product through gemm, {pa:.0}), PyTorch {b:.0} ({:.0}% of torch.mm's {pb:.0}): \
         the ceiling (a pass running wholly at the faster of the two product rates) is {:.2}x PyTorch",
        flop / 1e12,
        ours["tokens_per_pass"],
        100.0 * a / pa,
        100.0 * b / pb,
        pa.max(pb) / b,
    );
}

/// Runs this binary again with `args` and reads the JSON line it prints last.
fn run_child(args: &[&dyn AsRef<std::ffi::OsStr>]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(args.iter().map(|a| a.as_ref()))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bench child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(
        stdout.lines().last().context("child printed nothing")?,
    )?)
}

fn cases() -> anyhow::Result<Vec<(usize, usize)>> {
    let spec = std::env::var("BENCH_CASES").unwrap_or_else(|_| "128:0,128:1,256:0,256:1".into());
    spec.split(',')
        .filter(|c| !c.trim().is_empty())
        .map(|c| {
            let (l, n) = c
                .split_once(':')
                .context("BENCH_CASES: LENGTH:NEGATIVES,...")?;
            Ok((l.trim().parse()?, n.trim().parse()?))
        })
        .collect()
}

fn gib(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN) / (1u64 << 30) as f64
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    if args.get(1).map(String::as_str) == Some("--child-train") {
        let len = args[4].parse()?;
        return child_train(Path::new(&args[2]), Path::new(&args[3]), len, steps);
    }
    if args.get(1).map(String::as_str) == Some("--child-infer") {
        let len = args[4].parse()?;
        return child_infer(Path::new(&args[2]), Path::new(&args[3]), len);
    }
    let model = PathBuf::from(
        args.get(1)
            .context("usage: bench_train MODEL_DIR [BEIR_DIR] [PYTHON]")?,
    );
    let beir = PathBuf::from(args.get(2).map_or("../shared/data/debfaq", String::as_str));
    let python = args.get(3).cloned().unwrap_or_else(|| "python3".into());
    let (raw, passages) = load_texts(&beir)?;
    let tmp = std::env::temp_dir().join(format!("ragd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let passages_path = tmp.join("passages.jsonl");
    let mut f = std::fs::File::create(&passages_path)?;
    for t in &passages {
        writeln!(f, "{}", serde_json::json!({ "text": t }))?;
    }
    println!(
        "bench_train: batch {BATCH}, {steps} timed steps after {WARMUP} warm-up (median), threads {}",
        candle_core::utils::get_num_threads()
    );
    println!("| case | ragd | PyTorch | ratio | peak RSS ragd / PyTorch (GiB) | memory ratio |");
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    let mut bounds = Vec::new();
    for len in INFER_LENS {
        let lens = len.to_string();
        let ours = run_child(&[&"--child-infer", &model, &passages_path, &lens])?;
        let theirs = (python != "none")
            .then(|| {
                reference::run_reference(
                    &python,
                    "bench_train_reference.py",
                    &[
                        &"infer",
                        &model,
                        &passages_path,
                        &"--max-len",
                        &lens,
                        &"--passes",
                        &INFER_PASSES.to_string(),
                    ],
                )
            })
            .transpose()?;
        ratios.push(report(
            &format!("inference, length {len} (texts/s)"),
            &ours,
            theirs.as_ref(),
            "texts_per_s",
        ));
        if let Some(t) = &theirs {
            bounds.push((len, ours.clone(), t.clone()));
        }
    }
    for (len, negs) in cases()? {
        let pairs = with_negatives(&raw, negs);
        let ours_path = tmp.join(format!("pairs-{negs}.jsonl"));
        write_pairs(&ours_path, pairs.iter().cloned())?;
        // The reference takes consecutive batches of this file: the ones ragd's sampler draws.
        let plan = driver::plan_steps(&pairs, &config(len, steps, pairs.len()));
        let ordered_path = tmp.join(format!("ordered-{negs}.jsonl"));
        driver::write_batch_plan(&ordered_path, &pairs, &plan)?;
        let lens = len.to_string();
        let ours = run_child(&[&"--child-train", &model, &ours_path, &lens])?;
        let theirs = (python != "none")
            .then(|| {
                reference::run_reference(
                    &python,
                    "bench_train_reference.py",
                    &[
                        &"train",
                        &model,
                        &ordered_path,
                        &"--max-len",
                        &lens,
                        &"--batch-size",
                        &BATCH.to_string(),
                        &"--steps",
                        &steps.to_string(),
                    ],
                )
            })
            .transpose()?;
        let case = format!("training, length {len}, {negs} negative(s) (pairs/s)");
        ratios.push(report(&case, &ours, theirs.as_ref(), "pairs_per_s"));
    }
    if python != "none" {
        let speed: Vec<f64> = ratios.iter().map(|r| r.0).collect();
        let mem: Vec<f64> = ratios.iter().map(|r| r.1).collect();
        let range = |v: &[f64]| {
            (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(0.0, f64::max),
            )
        };
        let (s0, s1) = range(&speed);
        let (m0, m1) = range(&mem);
        println!("speed ratios (ragd / PyTorch) {s0:.2}x .. {s1:.2}x; memory ratios {m0:.2}x .. {m1:.2}x");
    }
    for (len, ours, theirs) in &bounds {
        print_product_bound(*len, passages.len(), ours, theirs);
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

/// Prints one table row; returns (speed ratio, memory ratio).
fn report(
    case: &str,
    ours: &serde_json::Value,
    theirs: Option<&serde_json::Value>,
    key: &str,
) -> (f64, f64) {
    let a = ours[key].as_f64().unwrap_or(f64::NAN);
    let ma = gib(&ours["peak_rss_bytes"]);
    let Some(t) = theirs else {
        println!("| {case} | {a:.2} | - | - | {ma:.2} / - | - |");
        return (f64::NAN, f64::NAN);
    };
    let b = t[key].as_f64().unwrap_or(f64::NAN);
    let mb = gib(&t["peak_rss_bytes"]);
    println!(
        "| {case} | {a:.2} | {b:.2} | {:.2}x | {ma:.2} / {mb:.2} | {:.2}x |",
        a / b,
        ma / mb
    );
    (a / b, ma / mb)
}
