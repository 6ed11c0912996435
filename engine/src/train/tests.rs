//! Tests of the training loop on a tiny BERT built from scratch (no download).

use super::*;
use crate::embed::tiny::{sample_texts, write_tiny_model, TinySpec};
use candle_core::Device;
use std::sync::atomic::Ordering;

pub(crate) fn tiny_encoder() -> (tempfile::TempDir, SentenceEncoder) {
    let dir = tempfile::tempdir().unwrap();
    let texts = sample_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    write_tiny_model(dir.path(), &refs, &TinySpec::default()).unwrap();
    let enc = SentenceEncoder::load_dir(dir.path(), &Device::Cpu).unwrap();
    (dir, enc)
}

/// Queries "where does the A find F?" with positive "the A eats F near the P".
pub(crate) fn toy_pairs() -> Vec<TrainPair> {
    let texts = sample_texts();
    texts
        .chunks(2)
        .map(|c| TrainPair {
            query: c[1].clone(),
            positive: c[0].clone(),
            negatives: vec![],
        })
        .collect()
}

/// Mean reciprocal rank of each query's own positive among all positives.
pub(crate) fn toy_mrr(enc: &SentenceEncoder, pairs: &[TrainPair]) -> f64 {
    let q: Vec<&str> = pairs.iter().map(|p| p.query.as_str()).collect();
    let d: Vec<&str> = pairs.iter().map(|p| p.positive.as_str()).collect();
    let qe = enc.encode(&q, 64).unwrap();
    let de = enc.encode(&d, 64).unwrap();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut total = 0.0;
    for (i, qv) in qe.iter().enumerate() {
        let own = dot(qv, &de[i]);
        let rank = de.iter().filter(|dv| dot(qv, dv) > own).count();
        total += 1.0 / (rank + 1) as f64;
    }
    total / pairs.len() as f64
}

fn with_negatives(pairs: &[TrainPair]) -> Vec<TrainPair> {
    let n = pairs.len();
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| TrainPair {
            negatives: vec![pairs[(i + 9) % n].positive.clone()],
            ..p.clone()
        })
        .collect()
}

fn grads(
    enc: &SentenceEncoder,
    pairs: &[TrainPair],
    cached: Option<usize>,
    seed: Option<u64>,
) -> (f32, Vec<Option<Tensor>>) {
    masked_grads(enc, pairs, cached, seed, None)
}

fn masked_grads(
    enc: &SentenceEncoder,
    pairs: &[TrainPair],
    cached: Option<usize>,
    seed: Option<u64>,
    mask: Option<&Tensor>,
) -> (f32, Vec<Option<Tensor>>) {
    let vars = enc.bert().trainable_vars();
    let mb: Vec<usize> = (0..8).collect();
    let mut rng = seed.map(Rng::new);
    let batch = Batch {
        pairs,
        mb: &mb,
        mask,
    };
    batch_grads(
        enc,
        &vars,
        &batch,
        &LossSpec::default(),
        cached,
        rng.as_mut(),
    )
    .unwrap()
}

#[test]
fn every_trainable_variable_gets_a_nonzero_gradient() {
    let (_d, enc) = tiny_encoder();
    let pairs = with_negatives(&toy_pairs());
    let (loss, g) = grads(&enc, &pairs, None, Some(1));
    assert!(loss.is_finite() && loss > 0.0);
    let vars = enc.bert().trainable_vars();
    assert_eq!(vars.len(), 5 + 16 * 2);
    for ((name, _), g) in vars.iter().zip(&g) {
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s > 0.0 && s.is_finite(), "{name} gradient sum {s}");
    }
}

fn assert_grads_close(g1: &[Option<Tensor>], g2: &[Option<Tensor>]) {
    for (a, b) in g1.iter().zip(g2) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-4 * scale.max(1e-3), "{diff} vs {scale}");
    }
}

#[test]
fn cached_mnrl_gradient_equals_plain_mnrl() {
    let (_d, enc) = tiny_encoder();
    let pairs = with_negatives(&toy_pairs());
    // Without dropout, any mini-batch size gives the plain gradient.
    let (l1, g1) = grads(&enc, &pairs, None, None);
    let (l2, g2) = grads(&enc, &pairs, Some(3), None);
    assert!((l1 - l2).abs() < 1e-5, "{l1} {l2}");
    assert_grads_close(&g1, &g2);
    // With dropout, one mini-batch per column draws the same masks as the plain loss: equal
    // gradients prove that the second pass replays the first pass's dropout masks.
    let (l3, g3) = grads(&enc, &pairs, None, Some(5));
    let (l4, g4) = grads(&enc, &pairs, Some(8), Some(5));
    assert!((l3 - l4).abs() < 1e-5, "{l3} {l4}");
    assert_grads_close(&g3, &g4);
    assert!((l1 - l3).abs() > 1e-4, "dropout is active");
}

#[test]
fn the_guide_mask_reaches_both_loss_paths() {
    let (_d, enc) = tiny_encoder();
    let pairs = with_negatives(&toy_pairs());
    // The guide is the untrained model itself: it ranks some candidates above their positive
    // (its toy MRR is well below 1), and not all of them.
    let g = guide::Guide::embed(&enc, &pairs, 0.0, 16).unwrap();
    let mb: Vec<usize> = (0..8).collect();
    let mut counts = guide::MaskCounts::default();
    let mask = g.mask(&mb, &Device::Cpu, &mut counts).unwrap();
    assert_eq!(counts.candidates, 8 * 16 - 8);
    assert!(
        counts.masked > 0 && counts.masked < counts.candidates,
        "{counts:?}"
    );
    let (plain, _) = grads(&enc, &pairs, None, None);
    let (l1, g1) = masked_grads(&enc, &pairs, None, None, Some(&mask));
    let (l2, g2) = masked_grads(&enc, &pairs, Some(3), None, Some(&mask));
    assert!(
        l1 < plain,
        "masking negatives lowers the loss: {plain} -> {l1}"
    );
    assert!((l1 - l2).abs() < 1e-5, "{l1} {l2}");
    assert_grads_close(&g1, &g2);
}

#[test]
fn training_with_a_guide_still_learns() {
    let (_d, mut enc) = tiny_encoder();
    let pairs = with_negatives(&toy_pairs());
    let before = toy_mrr(&enc, &pairs);
    let cfg = TrainConfig {
        guide_margin: Some(0.0),
        ..quick_cfg()
    };
    train(&mut enc, &pairs, &cfg, &AtomicBool::new(false), None).unwrap();
    let after = toy_mrr(&enc, &pairs);
    assert!(after > before + 0.1, "toy MRR {before} -> {after}");
}

fn quick_cfg() -> TrainConfig {
    TrainConfig {
        epochs: 4,
        batch_size: 16,
        lr: 2e-3,
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        ..TrainConfig::default()
    }
}

#[test]
fn a_shorter_training_length_is_undone_after_training() {
    let (_d, mut enc) = tiny_encoder();
    let own = enc.sentence_config().max_seq_length;
    assert!(own > 8, "the tiny model reads {own} tokens");
    let cfg = TrainConfig {
        max_seq_len: Some(8),
        max_steps: Some(1),
        ..quick_cfg()
    };
    train(&mut enc, &toy_pairs(), &cfg, &AtomicBool::new(false), None).unwrap();
    assert_eq!(enc.sentence_config().max_seq_length, own);
}

#[test]
fn loss_falls_and_toy_retrieval_improves() {
    let (_d, mut enc) = tiny_encoder();
    let pairs = toy_pairs();
    let before = toy_mrr(&enc, &pairs);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out = train(
        &mut enc,
        &pairs,
        &quick_cfg(),
        &AtomicBool::new(false),
        Some(&tx),
    )
    .unwrap();
    let after = toy_mrr(&enc, &pairs);
    let first = out.losses[..4].iter().sum::<f32>() / 4.0;
    let last = out.losses[out.losses.len() - 4..].iter().sum::<f32>() / 4.0;
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    assert!(after > before + 0.1, "toy MRR {before} -> {after}");
    assert_eq!(out.steps, 16);
    let mut steps = 0;
    while let Ok(ev) = rx.try_recv() {
        if let TrainEvent::Step(p) = ev {
            steps += 1;
            assert!(p.pairs_per_sec > 0.0 && p.total_steps == 16);
        }
    }
    assert_eq!(steps, 16);
}

#[test]
fn resume_reaches_the_same_final_loss() {
    let pairs = toy_pairs();
    let ck = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        epochs: 2,
        checkpoint_every: Some(3),
        checkpoint_dir: Some(ck.path().to_path_buf()),
        ..quick_cfg()
    };
    let (d1, mut a) = tiny_encoder();
    let full = train(&mut a, &pairs, &cfg, &AtomicBool::new(false), None).unwrap();
    let path = ck.path().join("checkpoint-3");
    assert!(path.join("state.json").exists());
    // A fresh process: the same base model reloaded, state restored from the checkpoint.
    let mut c = SentenceEncoder::load_dir(d1.path(), &Device::Cpu).unwrap();
    let resumed_cfg = TrainConfig {
        resume_from: Some(path.clone()),
        checkpoint_every: None,
        ..cfg.clone()
    };
    let resumed = train(&mut c, &pairs, &resumed_cfg, &AtomicBool::new(false), None).unwrap();
    assert_eq!(resumed.steps, full.steps);
    let (x, y) = (full.losses.last().unwrap(), resumed.losses.last().unwrap());
    assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
    let bad = TrainConfig {
        batch_size: 8,
        resume_from: Some(path),
        ..cfg
    };
    let mut e = SentenceEncoder::load_dir(d1.path(), &Device::Cpu).unwrap();
    let err = train(&mut e, &pairs, &bad, &AtomicBool::new(false), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch_size"), "{err}");
}

#[test]
fn cancellation_stops_before_the_next_step() {
    let (_d, mut enc) = tiny_encoder();
    let out = train(
        &mut enc,
        &toy_pairs(),
        &quick_cfg(),
        &AtomicBool::new(true),
        None,
    )
    .unwrap();
    assert!(out.cancelled);
    assert_eq!(out.steps, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_training_reports_and_cancels() {
    let (_d, enc) = tiny_encoder();
    let cfg = TrainConfig {
        epochs: 50,
        ..quick_cfg()
    };
    let mut h = spawn_training(enc, toy_pairs(), cfg);
    let mut seen = 0;
    while let Some(ev) = h.events.recv().await {
        if let TrainEvent::Step(p) = ev {
            seen = p.step;
            if p.step == 2 {
                h.cancel.store(true, Ordering::Relaxed);
            }
        }
    }
    let (_enc, out) = h.join.await.unwrap().unwrap();
    assert!(out.cancelled);
    assert_eq!(out.steps, seen);
    assert!(seen < 200);
}

#[test]
fn lora_matryoshka_and_accumulation_train() {
    let (_d, mut enc) = tiny_encoder();
    let base: Vec<f32> = enc.bert().base_vars()["encoder.layer.0.attention.self.query.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let pairs = toy_pairs();
    let cfg = TrainConfig {
        lora: Some(lora::LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["query".into(), "value".into(), "dense".into()],
        }),
        matryoshka_dims: Some(vec![32, 16]),
        grad_accum: 2,
        batch_size: 8,
        epochs: 6,
        lr: 5e-3,
        ..quick_cfg()
    };
    let out = train(&mut enc, &pairs, &cfg, &AtomicBool::new(false), None).unwrap();
    let first = out.losses[..3].iter().sum::<f32>();
    let last = out.losses[out.losses.len() - 3..].iter().sum::<f32>();
    assert!(last < first, "{first} -> {last}");
    let after: Vec<f32> = enc.bert().base_vars()["encoder.layer.0.attention.self.query.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(base, after, "LoRA leaves base weights alone");
    let bad = TrainConfig {
        matryoshka_dims: Some(vec![64]),
        ..quick_cfg()
    };
    let (_d2, mut e2) = tiny_encoder();
    let err = train(&mut e2, &pairs, &bad, &AtomicBool::new(false), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("64"), "{err}");
}
