//! Forward parity with sentence-transformers: embeddings of fixed sentences must match reference
//! vectors made by `scripts/make_reference_vectors.py` to max abs diff <= 1e-5.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ragd_engine::embed::SentenceEncoder;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// Max abs difference between the engine's embeddings and the reference file's.
fn max_abs_diff(model_dir: &Path, reference: &Path) -> f32 {
    let text = std::fs::read_to_string(reference)
        .unwrap_or_else(|e| panic!("{}: {e}", reference.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sentences: Vec<String> = serde_json::from_value(v["sentences"].clone()).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
    let enc = SentenceEncoder::load_dir(model_dir, &Device::Cpu).unwrap();
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let got = enc.encode(&refs, 4).unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .flat_map(|(g, w)| {
            assert_eq!(g.len(), w.len());
            g.iter().zip(w).map(|(a, b)| (a - b).abs())
        })
        .fold(0f32, f32::max)
}

/// The committed tiny model (`worker/testdata/tiny-bert`, made by the `make_tiny_model`
/// example) against sentence-transformers' vectors for it (`tiny-bert-reference.json`).
#[test]
fn tiny_model_matches_sentence_transformers() {
    let d = max_abs_diff(
        &testdata().join("tiny-bert"),
        &testdata().join("tiny-bert-reference.json"),
    );
    eprintln!("max abs diff {d:e}");
    assert!(d <= 1e-5, "max abs diff {d}");
}

/// all-MiniLM-L6-v2 against `minilm-reference.json`. Needs the real weights: $RAGD_MINILM_DIR,
/// else `models/all-MiniLM-L6-v2` under the repo root (`scripts/fetch-models.sh minilm`, which
/// the test command runs); absent, the test fails saying how to fetch them.
#[test]
fn minilm_matches_sentence_transformers() {
    let dir = std::env::var("RAGD_MINILM_DIR")
        .unwrap_or_else(|_| format!("{}/../models/all-MiniLM-L6-v2", env!("CARGO_MANIFEST_DIR")));
    assert!(
        Path::new(&dir).join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 weights not found in {dir}: from the repo root run \
         `scripts/fetch-models.sh minilm`, or set RAGD_MINILM_DIR"
    );
    let d = max_abs_diff(Path::new(&dir), &testdata().join("minilm-reference.json"));
    eprintln!("max abs diff {d:e}");
    assert!(d <= 1e-5, "max abs diff {d}");
}

/// The committed tiny cross-encoder (`worker/testdata/tiny-cross-encoder`, a
/// `BertForSequenceClassification` saved by sentence-transformers) against
/// `CrossEncoder.predict` logits and sigmoid scores made by `scripts/make_reranker_reference.py`
/// (pairs longer than the 64-token limit on either side included).
#[test]
fn tiny_cross_encoder_matches_sentence_transformers() {
    use ragd_engine::rerank::{CrossEncoder, HeadOrigin};
    let reference = testdata().join("tiny-cross-encoder-reference.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    let pairs: Vec<(String, String)> = serde_json::from_value(v["pairs"].clone()).unwrap();
    let want_logits: Vec<f32> = serde_json::from_value(v["logits"].clone()).unwrap();
    let want_scores: Vec<f32> = serde_json::from_value(v["scores"].clone()).unwrap();
    let model =
        CrossEncoder::load_dir(&testdata().join("tiny-cross-encoder"), &Device::Cpu, 0).unwrap();
    assert_eq!(model.head().origin(), HeadOrigin::Loaded);
    assert_eq!(model.max_len(), v["max_length"].as_u64().unwrap() as usize);
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(q, p)| (q.as_str(), p.as_str()))
        .collect();
    let logits = model.predict(&refs, 3).unwrap();
    let scores = model.score(&refs, 3).unwrap();
    // One logit and one score per pair: the comparison below zips, so a short answer would
    // otherwise pass unseen.
    assert!(!pairs.is_empty(), "the reference has no pairs");
    assert_eq!(want_logits.len(), pairs.len(), "reference logits per pair");
    assert_eq!(want_scores.len(), pairs.len(), "reference scores per pair");
    assert_eq!(logits.len(), pairs.len(), "one logit per pair");
    assert_eq!(scores.len(), pairs.len(), "one score per pair");
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (dl, ds) = (diff(&logits, &want_logits), diff(&scores, &want_scores));
    eprintln!("max abs diff: logits {dl:e}, scores {ds:e}");
    assert!(dl <= 1e-4, "logits {logits:?} vs {want_logits:?}");
    assert!(ds <= 1e-4, "scores {scores:?} vs {want_scores:?}");
}
