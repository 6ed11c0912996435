//! Tests of the cross-encoder on tiny models built by the tests (no download).

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};

use super::export::export_reranker;
use super::loss::RerankLoss;
use super::train::{train_reranker, RerankTrainConfig};
use super::*;
use crate::embed::tiny::{sample_texts, write_tiny_model, TinySpec};
use crate::train::data::TrainPair;
use crate::train::optim::AdamWConfig;
use crate::train::{TrainConfig, TrainEvent};

/// A tiny encoder directory (no head: the cross-encoder gets a new one).
pub(crate) fn tiny_encoder_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let texts = sample_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    write_tiny_model(dir.path(), &refs, &TinySpec::default()).unwrap();
    dir
}

/// Queries "where does the A find F?", positive "the A eats F near the P", and two negatives
/// about other animals and foods.
pub(crate) fn toy_rows() -> Vec<TrainPair> {
    let texts = sample_texts();
    let docs: Vec<&String> = texts.iter().step_by(2).collect();
    let n = docs.len();
    texts
        .chunks(2)
        .enumerate()
        .map(|(i, c)| TrainPair {
            query: c[1].clone(),
            positive: c[0].clone(),
            negatives: vec![docs[(i + 9) % n].clone(), docs[(i + 18) % n].clone()],
        })
        .collect()
}

/// Mean reciprocal rank of each query's positive among its positive and hard negatives.
fn toy_mrr(model: &CrossEncoder, rows: &[TrainPair]) -> f64 {
    let mut total = 0.0;
    for r in rows {
        let mut pairs = vec![(r.query.as_str(), r.positive.as_str())];
        pairs.extend(r.negatives.iter().map(|n| (r.query.as_str(), n.as_str())));
        let s = model.predict(&pairs, 16).unwrap();
        let rank = s[1..].iter().filter(|&&v| v > s[0]).count();
        total += 1.0 / (rank + 1) as f64;
    }
    total / rows.len() as f64
}

fn quick_cfg(loss: &str) -> RerankTrainConfig {
    RerankTrainConfig {
        train: TrainConfig {
            epochs: 30,
            batch_size: 8,
            lr: 2e-3,
            adamw: AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            ..TrainConfig::default()
        },
        loss: RerankLoss::from_name(loss).unwrap(),
        negatives: None,
        new_head_lr_scale: 5.0,
    }
}

/// Gradient magnitude of every trainable variable for one micro-batch of six queries, through
/// the trainer's own micro-batch path (in-batch negatives included for MNRL).
fn grad_sums(model: &CrossEncoder, loss: &str) -> Vec<(String, f32)> {
    let rows = toy_rows();
    let vars = model.trainable_vars();
    let mb: Vec<usize> = (0..6).collect();
    let mut rng = crate::rng::Rng::new(1);
    let loss = RerankLoss::from_name(loss).unwrap();
    let (value, grads) =
        super::train::micro_batch_grads(model, &vars, &rows, &mb, &loss, 1, Some(&mut rng))
            .unwrap();
    assert!(value.is_finite() && value > 0.0);
    vars.iter()
        .zip(grads)
        .map(|((n, _), g)| {
            let s = g.map_or(0.0, |t: Tensor| {
                t.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            });
            (n.clone(), s)
        })
        .collect()
}

#[test]
fn every_trainable_variable_gets_a_nonzero_gradient() {
    let dir = tiny_encoder_dir();
    let model = CrossEncoder::load_dir(dir.path(), &Device::Cpu, 1).unwrap();
    assert_eq!(model.head().origin(), HeadOrigin::NewPoolerAndClassifier);
    for loss in ["bce", "mnrl", "lambda"] {
        let sums = grad_sums(&model, loss);
        assert_eq!(sums.len(), 5 + 16 * 2 + 4);
        for (name, s) in sums {
            // LambdaLoss sees only score differences, so a shift of every logit (the classifier
            // bias) changes nothing: its gradient is zero in exact arithmetic, as in PyTorch.
            if loss == "lambda" && name == "classifier.bias" {
                assert!(s < 1e-6, "{loss}: {name} gradient sum {s}");
                continue;
            }
            assert!(s > 0.0 && s.is_finite(), "{loss}: {name} gradient sum {s}");
        }
    }
}

#[test]
fn a_shorter_training_length_is_undone_after_training() {
    let dir = tiny_encoder_dir();
    let mut model = CrossEncoder::load_dir(dir.path(), &Device::Cpu, 7).unwrap();
    let own = model.max_len();
    assert!(own > 8, "the tiny model reads {own} tokens per pair");
    let mut cfg = quick_cfg("bce");
    cfg.train.max_seq_len = Some(8);
    cfg.train.max_steps = Some(1);
    train_reranker(&mut model, &toy_rows(), &cfg, &AtomicBool::new(false), None).unwrap();
    assert_eq!(model.max_len(), own);
}

#[test]
fn loss_falls_and_toy_reranking_improves_with_each_loss() {
    let dir = tiny_encoder_dir();
    let rows = &toy_rows()[..16];
    for loss in ["bce", "mnrl", "lambda"] {
        let mut model = CrossEncoder::load_dir(dir.path(), &Device::Cpu, 7).unwrap();
        let before = toy_mrr(&model, rows);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let out = train_reranker(
            &mut model,
            rows,
            &quick_cfg(loss),
            &AtomicBool::new(false),
            Some(&tx),
        )
        .unwrap();
        let after = toy_mrr(&model, rows);
        let k = 4;
        let first = out.losses[..k].iter().sum::<f32>() / k as f32;
        let last = out.losses[out.losses.len() - k..].iter().sum::<f32>() / k as f32;
        assert!(last < 0.6 * first, "{loss}: loss {first} -> {last}");
        // Before training the logits are nearly equal, so the starting MRR is noise (0.5-0.75).
        assert!(
            after >= 0.95 && after > before,
            "{loss}: toy MRR {before} -> {after}"
        );
        let steps = std::iter::from_fn(|| rx.try_recv().ok())
            .filter(|e| matches!(e, TrainEvent::Step(p) if p.pairs_per_sec > 0.0))
            .count();
        assert_eq!(steps, out.steps);
    }
}

#[test]
fn exported_reranker_reloads_as_a_sequence_classifier_with_the_same_scores() {
    let dir = tiny_encoder_dir();
    let mut model = CrossEncoder::load_dir(dir.path(), &Device::Cpu, 3).unwrap();
    let cfg = RerankTrainConfig {
        train: TrainConfig {
            max_steps: Some(3),
            lora: Some(Default::default()),
            ..quick_cfg("bce").train
        },
        ..quick_cfg("bce")
    };
    train_reranker(&mut model, &toy_rows(), &cfg, &AtomicBool::new(false), None).unwrap();
    let out = tempfile::tempdir().unwrap();
    export_reranker(&model, out.path(), None).unwrap();
    assert!(!out.path().join("modules.json").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    let back = CrossEncoder::load_dir(out.path(), &Device::Cpu, 99).unwrap();
    assert_eq!(back.head().origin(), HeadOrigin::Loaded);
    assert_eq!(back.max_len(), model.max_len());
    let pairs = [
        (
            "where does the owl find mice?",
            "the owl eats mice near the lake",
        ),
        (
            "where does the fox find berries?",
            "the cat eats fish near the river",
        ),
    ];
    let a = model.predict(&pairs, 8).unwrap();
    let b = back.predict(&pairs, 8).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    let s = back.score(&pairs, 8).unwrap();
    assert!((s[0] - 1.0 / (1.0 + (-b[0]).exp())).abs() < 1e-6);
}

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn unusable_heads_and_tokenizers_are_explained() {
    let dir = tiny_encoder_dir();
    let model = CrossEncoder::load_dir(dir.path(), &Device::Cpu, 3).unwrap();
    let out = tempfile::tempdir().unwrap();
    export_reranker(&model, out.path(), None).unwrap();
    let load = |d: &std::path::Path| {
        CrossEncoder::load_dir(d, &Device::Cpu, 3)
            .unwrap_err()
            .to_string()
    };

    // Two labels in config.json.
    edit_config(out.path(), |v| {
        v["id2label"] = serde_json::json!({"0": "no", "1": "yes"});
    });
    let err = load(out.path());
    assert!(
        err.contains("has 2 labels") && err.contains("num_labels 1"),
        "{err}"
    );

    // One label in config.json but a (3, hidden) classifier in the weights.
    edit_config(out.path(), |v| {
        v["id2label"] = serde_json::json!({"0": "x"})
    });
    let st = out.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    tensors.insert(
        "classifier.weight".into(),
        Tensor::zeros((3, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let list: Vec<(String, Tensor)> = tensors.clone().into_iter().collect();
    crate::embed::model::save_safetensors(&st, &list).unwrap();
    let err = load(out.path());
    assert!(err.contains("has 3 labels"), "{err}");

    // The head's weights are missing.
    tensors.remove("classifier.weight");
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    crate::embed::model::save_safetensors(&st, &list).unwrap();
    let err = load(out.path());
    assert!(
        err.contains("BertForSequenceClassification") && err.contains("classifier.weight"),
        "{err}"
    );

    // A tokenizer from a model with a larger vocabulary.
    let other = tempfile::tempdir().unwrap();
    let mut many: Vec<String> = sample_texts();
    many.extend((0..300).map(|i| format!("word{i} token{i} extra{i}")));
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let spec = TinySpec {
        vocab_size: 600,
        ..TinySpec::default()
    };
    write_tiny_model(other.path(), &refs, &spec).unwrap();
    std::fs::copy(
        other.path().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let err = load(dir.path());
    assert!(err.contains("does not match the model"), "{err}");
}

#[test]
fn resume_reaches_the_same_weights() {
    let dir = tiny_encoder_dir();
    let rows = toy_rows();
    let ck = tempfile::tempdir().unwrap();
    let base = RerankTrainConfig {
        train: TrainConfig {
            epochs: 1,
            batch_size: 16,
            ..quick_cfg("mnrl").train
        },
        ..quick_cfg("mnrl")
    };
    let mut full = CrossEncoder::load_dir(dir.path(), &Device::Cpu, 5).unwrap();
    let a = train_reranker(&mut full, &rows, &base, &AtomicBool::new(false), None).unwrap();
    let mut part = CrossEncoder::load_dir(dir.path(), &Device::Cpu, 5).unwrap();
    let first = RerankTrainConfig {
        train: TrainConfig {
            checkpoint_every: Some(2),
            checkpoint_dir: Some(ck.path().to_path_buf()),
            ..base.train.clone()
        },
        ..base.clone()
    };
    let cancel = AtomicBool::new(false);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    train_reranker(&mut part, &rows, &first, &cancel, Some(&tx)).unwrap();
    let ckpt = std::iter::from_fn(|| rx.try_recv().ok())
        .find_map(|e| match e {
            TrainEvent::Checkpoint { step: 2, path } => Some(path),
            _ => None,
        })
        .expect("a checkpoint at step 2");
    let mut resumed = CrossEncoder::load_dir(dir.path(), &Device::Cpu, 5).unwrap();
    let second = RerankTrainConfig {
        train: TrainConfig {
            resume_from: Some(ckpt),
            ..base.train.clone()
        },
        ..base.clone()
    };
    let b = train_reranker(&mut resumed, &rows, &second, &cancel, None).unwrap();
    assert_eq!(a.steps, b.steps);
    let (la, lb) = (a.losses.last().unwrap(), b.losses.last().unwrap());
    assert!((la - lb).abs() < 1e-5, "{la} vs {lb}");
}

#[test]
fn short_rows_are_filled_and_cost_the_others_nothing() {
    let dir = tiny_encoder_dir();
    let mut rows = toy_rows()[..8].to_vec();
    let want = rows[2].negatives.len();
    assert!(want >= 2, "the toy rows carry negatives");
    rows[0].negatives.clear();
    rows[1].negatives.truncate(1);
    let mut model = CrossEncoder::load_dir(dir.path(), &Device::Cpu, 1).unwrap();
    let cfg = RerankTrainConfig {
        train: TrainConfig {
            epochs: 1,
            batch_size: 2,
            ..quick_cfg("bce").train
        },
        ..quick_cfg("bce")
    };
    let kept = super::train::rows(&rows, &cfg).unwrap();
    assert_eq!(kept.len(), 8, "no row is left out");
    for (k, r) in kept.iter().zip(&rows) {
        assert_eq!(k.negatives.len(), want);
        assert!(!k.negatives.contains(&k.positive));
        assert_eq!(
            k.negatives[..r.negatives.len()],
            r.negatives[..],
            "mined ones kept first"
        );
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    train_reranker(&mut model, &rows, &cfg, &AtomicBool::new(false), Some(&tx)).unwrap();
    let started = std::iter::from_fn(|| rx.try_recv().ok()).find_map(|e| match e {
        TrainEvent::Started { pairs, .. } => Some(pairs),
        _ => None,
    });
    assert_eq!(started, Some(8), "every row is trained on");
    for r in &mut rows {
        r.negatives.clear();
    }
    let err = train_reranker(&mut model, &rows, &cfg, &AtomicBool::new(false), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("need hard negatives"), "{err}");
}
