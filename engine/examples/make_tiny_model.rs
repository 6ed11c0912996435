//! Writes the tiny test model committed under `engine/testdata/tiny-bert` (random weights, a
//! WordPiece vocabulary trained on the sample texts):
//! `cargo run -p ragd-engine --example make_tiny_model -- engine/testdata/tiny-bert`.

use ragd_engine::embed::tiny::{sample_texts, write_tiny_model, TinySpec};

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: make_tiny_model OUT_DIR"))?;
    let texts = sample_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let spec = TinySpec {
        vocab_size: 200,
        hidden_size: 16,
        intermediate_size: 32,
        ..TinySpec::default()
    };
    write_tiny_model(std::path::Path::new(&out), &refs, &spec)?;
    println!("wrote {out}");
    Ok(())
}
