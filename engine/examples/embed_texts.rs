//! Embeds texts with the Rust engine and writes `{"sentences", "embeddings"}` JSON, for
//! `scripts/compare_export.py`:
//! `cargo run --release -p ragd-engine --example embed_texts -- MODEL_DIR OUT.json [TEXTS.json]`.
//! TEXTS.json is a JSON object with a `sentences` array (for example a reference file from
//! `scripts/make_reference_vectors.py`); without it a built-in list is used.

use candle_core::Device;
use ragd_engine::embed::SentenceEncoder;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        anyhow::bail!("usage: embed_texts MODEL_DIR OUT.json [TEXTS.json]");
    }
    let sentences: Vec<String> = match args.get(3) {
        Some(p) => {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p)?)?;
            serde_json::from_value(v["sentences"].clone())?
        }
        None => [
            "How do I upgrade Debian to a new release?",
            "the cat eats fish near the river",
            "PostgreSQL supports transactional DDL.",
            "short",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    };
    let enc = SentenceEncoder::load_dir(std::path::Path::new(&args[1]), &Device::Cpu)?;
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let emb = enc.encode(&refs, 8)?;
    let v = serde_json::json!({"sentences": sentences, "embeddings": emb});
    std::fs::write(&args[2], serde_json::to_string(&v)?)?;
    println!("wrote {} embeddings to {}", emb.len(), args[2]);
    Ok(())
}
