//! Model configuration: the Hugging Face `config.json` of a BERT-family encoder and the
//! sentence-transformers files (`modules.json`, `1_Pooling/config.json`,
//! `sentence_bert_config.json`) that decide pooling, maximum length and normalisation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors raised while reading configuration files.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required file is absent.
    #[error("{path}: file is missing ({hint})")]
    Missing {
        /// The missing file.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
    },
    /// A file exists but could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not valid JSON of the expected shape.
    #[error("{path}: malformed JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error (with line and column).
        source: serde_json::Error,
    },
    /// A value is present but not supported by this engine.
    #[error("{path}: {what}")]
    Unsupported {
        /// The file holding the value.
        path: PathBuf,
        /// What is unsupported and what to do.
        what: String,
    },
}

/// The subset of a Hugging Face BERT `config.json` that the encoder needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Activation of the feed-forward block (only `gelu` is supported).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout on hidden states during training.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities during training.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Number of learned positions.
    pub max_position_embeddings: usize,
    /// Number of token types.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Model type as written by transformers (`bert`).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Position embedding type (only `absolute` is supported).
    #[serde(default = "default_pos_type")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_model_type() -> String {
    "bert".into()
}
fn default_pos_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Reads and validates `config.json` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let cfg: BertConfig = read_json(
            &path,
            "a model directory needs the Hugging Face config.json",
        )?;
        cfg.validate(&path)?;
        Ok(cfg)
    }

    /// Checks that the configuration describes a model this engine can run.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |what: String| ConfigError::Unsupported {
            path: path.to_path_buf(),
            what,
        };
        if !matches!(self.model_type.as_str(), "bert") {
            return Err(bad(format!(
                "model_type {:?} is not supported: only BERT-family encoders (bert, MiniLM) are",
                self.model_type
            )));
        }
        if self.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act {:?} is not supported: only \"gelu\" (erf) is",
                self.hidden_act
            )));
        }
        if self.position_embedding_type != "absolute" {
            return Err(bad(format!(
                "position_embedding_type {:?} is not supported: only \"absolute\" is",
                self.position_embedding_type
            )));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }

    /// The JSON written into an exported model's `config.json`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "initializer_range": 0.02,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
        })
    }
}

/// How token embeddings are pooled into one sentence embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over non-padding tokens.
    Mean,
    /// The first (`[CLS]`) token.
    Cls,
    /// Element-wise maximum over non-padding tokens.
    Max,
}

#[derive(Debug, Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    /// sentence-transformers >= 5's form: one mode name (or a list of them); when present it
    /// replaces the `pooling_mode_*` flags.
    #[serde(default)]
    pooling_mode: Option<serde_json::Value>,
}

/// The part of a tokenizer_config.json read here (transformers writes a huge number for "no
/// limit", hence a float).
#[derive(Debug, Deserialize)]
struct TokenizerConfigFile {
    #[serde(default)]
    model_max_length: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Deserialize)]
struct SbertFile {
    max_seq_length: Option<usize>,
}

/// The sentence-transformers pipeline around the encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentenceConfig {
    /// Pooling mode.
    pub pooling: Pooling,
    /// Whether embeddings are L2-normalised.
    pub normalize: bool,
    /// Maximum number of tokens per text (longer texts are truncated).
    pub max_seq_length: usize,
}

impl SentenceConfig {
    /// Reads the sentence-transformers files in `dir`. Without `modules.json` the model is a plain
    /// Hugging Face encoder and gets sentence-transformers' default: mean pooling, no normalisation.
    pub fn from_dir(dir: &Path, bert: &BertConfig) -> Result<Self, ConfigError> {
        let modules_path = dir.join("modules.json");
        let mut pooling = Pooling::Mean;
        let mut normalize = false;
        if modules_path.exists() {
            let modules: Vec<ModuleEntry> = read_json(&modules_path, "")?;
            let mut saw_transformer = false;
            for m in &modules {
                match m.kind.rsplit('.').next().unwrap_or("") {
                    "Transformer" => saw_transformer = true,
                    "Normalize" => normalize = true,
                    "Pooling" => {
                        let p = dir.join(&m.path).join("config.json");
                        pooling = read_pooling(&p)?;
                    }
                    other => {
                        return Err(ConfigError::Unsupported {
                            path: modules_path.clone(),
                            what: format!(
                                "module type {other:?} ({}) is not supported: only Transformer, \
                                 Pooling and Normalize are",
                                m.kind
                            ),
                        })
                    }
                }
            }
            if !saw_transformer {
                return Err(ConfigError::Unsupported {
                    path: modules_path,
                    what: "no sentence_transformers.models.Transformer module listed".into(),
                });
            }
        } else {
            tracing::warn!(
                dir = %dir.display(),
                "no modules.json: treating the model as a plain encoder with mean pooling"
            );
        }
        // sentence_bert_config.json's max_seq_length; sentence-transformers >= 5 keeps it in
        // tokenizer_config.json's model_max_length instead; else the model's positions.
        let sbert_path = dir.join("sentence_bert_config.json");
        let from_sbert = if sbert_path.exists() {
            read_json::<SbertFile>(&sbert_path, "")?.max_seq_length
        } else {
            None
        };
        let tok_path = dir.join("tokenizer_config.json");
        let from_tokenizer = || {
            tok_path.exists().then(|| {
                read_json::<TokenizerConfigFile>(&tok_path, "")
                    .ok()
                    .and_then(|t| t.model_max_length)
                    .filter(|&n| n > 0.0 && n < 1e9)
                    .map(|n| n as usize)
            })?
        };
        let max_seq_length = from_sbert
            .or_else(from_tokenizer)
            .unwrap_or(bert.max_position_embeddings)
            .min(bert.max_position_embeddings);
        Ok(Self {
            pooling,
            normalize,
            max_seq_length,
        })
    }
}

impl SentenceConfig {
    /// Writes `modules.json`, `1_Pooling/config.json` and `sentence_bert_config.json` into `dir`
    /// for a model of width `hidden`, so that sentence-transformers loads the same pipeline.
    pub fn write_to(&self, dir: &Path, hidden: usize) -> Result<(), ConfigError> {
        let mut modules = vec![
            serde_json::json!({"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"}),
            serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}),
        ];
        if self.normalize {
            modules.push(
                serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize"}),
            );
        }
        let pooling = serde_json::json!({
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": self.pooling == Pooling::Cls,
            "pooling_mode_mean_tokens": self.pooling == Pooling::Mean,
            "pooling_mode_max_tokens": self.pooling == Pooling::Max,
            "pooling_mode_mean_sqrt_len_tokens": false,
        });
        let sbert =
            serde_json::json!({"max_seq_length": self.max_seq_length, "do_lower_case": false});
        write_json(
            &dir.join("modules.json"),
            &serde_json::Value::Array(modules),
        )?;
        let pdir = dir.join("1_Pooling");
        std::fs::create_dir_all(&pdir).map_err(|source| ConfigError::Io {
            path: pdir.clone(),
            source,
        })?;
        write_json(&pdir.join("config.json"), &pooling)?;
        write_json(&dir.join("sentence_bert_config.json"), &sbert)
    }
}

/// Writes pretty JSON to `path`.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ConfigError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values always serialise");
    std::fs::write(path, text).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_pooling(path: &Path) -> Result<Pooling, ConfigError> {
    let p: PoolingFile = read_json(
        path,
        "modules.json lists a Pooling module whose config is absent",
    )?;
    let unsupported = |mode: &str| ConfigError::Unsupported {
        path: path.to_path_buf(),
        what: format!("pooling mode {mode} is not supported: use mean, cls or max"),
    };
    if let Some(mode) = &p.pooling_mode {
        let modes: Vec<&str> = match mode {
            serde_json::Value::String(m) => vec![m.as_str()],
            serde_json::Value::Array(a) => a.iter().filter_map(|m| m.as_str()).collect(),
            _ => Vec::new(),
        };
        return match modes.as_slice() {
            ["mean"] => Ok(Pooling::Mean),
            ["cls"] => Ok(Pooling::Cls),
            ["max"] => Ok(Pooling::Max),
            [one] => Err(unsupported(one)),
            _ => Err(ConfigError::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "pooling_mode {mode} is not supported: give one of \"mean\", \"cls\" or \"max\""
                ),
            }),
        };
    }
    if p.pooling_mode_mean_sqrt_len_tokens {
        return Err(unsupported("mean_sqrt_len_tokens"));
    }
    if p.pooling_mode_weightedmean_tokens {
        return Err(unsupported("weightedmean_tokens"));
    }
    if p.pooling_mode_lasttoken {
        return Err(unsupported("lasttoken"));
    }
    match (
        p.pooling_mode_mean_tokens,
        p.pooling_mode_cls_token,
        p.pooling_mode_max_tokens,
    ) {
        (true, false, false) => Ok(Pooling::Mean),
        (false, true, false) => Ok(Pooling::Cls),
        (false, false, true) => Ok(Pooling::Max),
        _ => Err(ConfigError::Unsupported {
            path: path.to_path_buf(),
            what: "exactly one of pooling_mode_mean_tokens, pooling_mode_cls_token, \
                   pooling_mode_max_tokens must be true"
                .into(),
        }),
    }
}

/// Reads a JSON file, mapping absence, I/O and parse failures to [`ConfigError`].
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    hint: &'static str,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ConfigError::Missing {
                path: path.to_path_buf(),
                hint: if hint.is_empty() {
                    "the file is listed but absent"
                } else {
                    hint
                },
            }
        } else {
            ConfigError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bert_json() -> serde_json::Value {
        serde_json::json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32})
    }

    #[test]
    fn reads_plain_bert_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), bert_json().to_string()).unwrap();
        let cfg = BertConfig::from_dir(dir.path()).unwrap();
        assert_eq!(cfg.hidden_act, "gelu");
        let s = SentenceConfig::from_dir(dir.path(), &cfg).unwrap();
        assert_eq!(s.pooling, Pooling::Mean);
        assert!(!s.normalize);
        assert_eq!(s.max_seq_length, 32);
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = BertConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("missing"),
            "{err}"
        );
        std::fs::write(dir.path().join("config.json"), "{\"vocab_size\": 3,\n oops").unwrap();
        let err = BertConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn sentence_transformers_files_decide_pooling() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("config.json"), bert_json().to_string()).unwrap();
        std::fs::write(
            d.join("modules.json"),
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
               {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
               {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        )
        .unwrap();
        let cfg = BertConfig::from_dir(d).unwrap();
        let err = SentenceConfig::from_dir(d, &cfg).unwrap_err().to_string();
        assert!(err.contains("1_Pooling"), "{err}");
        std::fs::create_dir(d.join("1_Pooling")).unwrap();
        std::fs::write(
            d.join("1_Pooling/config.json"),
            r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
        )
        .unwrap();
        std::fs::write(
            d.join("sentence_bert_config.json"),
            r#"{"max_seq_length": 16}"#,
        )
        .unwrap();
        let s = SentenceConfig::from_dir(d, &cfg).unwrap();
        assert_eq!(
            s,
            SentenceConfig {
                pooling: Pooling::Cls,
                normalize: true,
                max_seq_length: 16
            }
        );
        // sentence-transformers >= 5 keeps the length in tokenizer_config.json.
        std::fs::write(
            d.join("sentence_bert_config.json"),
            r#"{"module_output_name": "x"}"#,
        )
        .unwrap();
        let length = || SentenceConfig::from_dir(d, &cfg).unwrap().max_seq_length;
        assert_eq!(length(), 32, "the model's positions without either file");
        std::fs::write(
            d.join("tokenizer_config.json"),
            r#"{"model_max_length": 12}"#,
        )
        .unwrap();
        assert_eq!(length(), 12);
        std::fs::write(
            d.join("tokenizer_config.json"),
            r#"{"model_max_length": 1e30}"#,
        )
        .unwrap();
        assert_eq!(length(), 32, "transformers' 'no limit'");
        // sentence-transformers >= 5 writes one `pooling_mode` (what 6.3 saved, verbatim).
        for (file, want) in [
            (
                r#"{"embedding_dimension": 8, "pooling_mode": "mean", "include_prompt": true}"#,
                Ok(Pooling::Mean),
            ),
            (r#"{"pooling_mode": ["max"]}"#, Ok(Pooling::Max)),
            (r#"{"pooling_mode": "lasttoken"}"#, Err("lasttoken")),
            (r#"{"pooling_mode": ["mean", "max"]}"#, Err("\"mean\"")),
        ] {
            std::fs::write(d.join("1_Pooling/config.json"), file).unwrap();
            match (SentenceConfig::from_dir(d, &cfg), want) {
                (Ok(s), Ok(p)) => assert_eq!(s.pooling, p, "{file}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{file}: {e}"),
                (got, _) => panic!("{file}: {got:?}"),
            }
        }
    }

    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("config.json"), bert_json().to_string()).unwrap();
        let cfg = BertConfig::from_dir(d).unwrap();
        for s in [
            SentenceConfig {
                pooling: Pooling::Max,
                normalize: false,
                max_seq_length: 20,
            },
            SentenceConfig {
                pooling: Pooling::Mean,
                normalize: true,
                max_seq_length: 32,
            },
        ] {
            s.write_to(d, 8).unwrap();
            assert_eq!(SentenceConfig::from_dir(d, &cfg).unwrap(), s);
        }
    }

    #[test]
    fn unsupported_activation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = bert_json();
        j["hidden_act"] = "relu".into();
        std::fs::write(dir.path().join("config.json"), j.to_string()).unwrap();
        let err = BertConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("relu"), "{err}");
    }
}
