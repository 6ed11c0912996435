//! Writes a reranker as a Hugging Face `BertForSequenceClassification` directory that
//! `sentence_transformers.CrossEncoder(DIR)` (and transformers) load unchanged.

use std::path::Path;

use super::CrossEncoder;
use crate::embed::model::save_safetensors;
use crate::export::{copy, write_json, ExportError, TrainingMetadata, TOKENIZER_FILES};

/// Writes `model` (LoRA adapters merged) to `out`: config.json (architecture, one label, the
/// activation sentence-transformers applies), model.safetensors (`bert.*`, `bert.pooler.*`,
/// `classifier.*`), the tokenizer files with `model_max_length` set to the model's pair length
/// and, if given, training_metadata.json.
pub fn export_reranker(
    model: &CrossEncoder,
    out: &Path,
    metadata: Option<&TrainingMetadata>,
) -> Result<(), ExportError> {
    std::fs::create_dir_all(out).map_err(|source| ExportError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut config = model.bert().config().to_hf_json();
    config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    config["id2label"] = serde_json::json!({"0": "LABEL_0"});
    config["label2id"] = serde_json::json!({"LABEL_0": 0});
    config["sentence_transformers"] = serde_json::json!({
        "activation_fn": model.head().activation().torch_name(),
        "version": concat!("ragd-worker ", env!("CARGO_PKG_VERSION")),
    });
    write_json(&out.join("config.json"), &config)?;
    let mut tensors = model.bert().export_tensors_prefixed("bert.")?;
    tensors.extend(model.head().export_tensors());
    save_safetensors(&out.join("model.safetensors"), &tensors)?;
    let src = model.dir();
    for f in TOKENIZER_FILES {
        let p = src.join(f);
        if p.exists() && src != out {
            copy(&p, &out.join(f))?;
        }
    }
    let tok_cfg_path = out.join("tokenizer_config.json");
    let mut tok_cfg = std::fs::read_to_string(&tok_cfg_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    tok_cfg["model_max_length"] = serde_json::json!(model.max_len());
    write_json(&tok_cfg_path, &tok_cfg)?;
    // A sentence-transformers embedder's pipeline files would make the directory load as an
    // embedder; a reranker directory is a plain Hugging Face model.
    for stale in [
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    ] {
        let p = out.join(stale);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|source| ExportError::Io { path: p, source })?;
        }
    }
    if let Some(m) = metadata {
        let v = serde_json::to_value(m).expect("metadata serialises");
        write_json(&out.join("training_metadata.json"), &v)?;
    }
    tracing::info!(out = %out.display(), "exported cross-encoder reranker");
    Ok(())
}
