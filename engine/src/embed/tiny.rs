//! A tiny randomly initialised BERT with a WordPiece vocabulary trained on given texts, written
//! as a complete sentence-transformers model directory. Tests and CI use it so that nothing has
//! to be downloaded.

use std::path::Path;

use candle_core::Device;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::config::{write_json, BertConfig, Pooling, SentenceConfig};
use super::model::{save_safetensors, Bert};
use super::EmbedError;
use crate::rng::Rng;

/// Shape of the tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// Target vocabulary size of the WordPiece trainer.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Number of layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Learned positions (and maximum sequence length).
    pub max_positions: usize,
    /// Seed of the weight initialisation.
    pub seed: u64,
    /// Pooling written into the sentence-transformers files.
    pub pooling: Pooling,
    /// Whether a Normalize module is listed.
    pub normalize: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            vocab_size: 400,
            hidden_size: 32,
            layers: 2,
            heads: 4,
            intermediate_size: 64,
            max_positions: 64,
            seed: 42,
            pooling: Pooling::Mean,
            normalize: true,
        }
    }
}

const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Trains a BERT WordPiece tokenizer (lower-casing, `[CLS] .. [SEP]`) on `texts`.
pub fn train_wordpiece(texts: &[&str], vocab_size: usize) -> Result<Tokenizer, EmbedError> {
    let tok_err = |e: tokenizers::Error| EmbedError::TinyModel {
        message: e.to_string(),
    };
    let mut trainer: TrainerWrapper = WordPieceTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(WordPiece::default());
    tokenizer.with_normalizer(Some(BertNormalizer::default()));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(WordPieceDecoder::default()));
    tokenizer
        .train(&mut trainer, texts.iter().copied())
        .map_err(tok_err)?;
    // The trainer breaks ties between equally frequent merges in hash order, which differs from
    // process to process, so its merged pieces (and every id) would too. Keep what it learned
    // that is order-free, its alphabet, add every whole word of the texts, and number them in a
    // fixed order: the same texts give the same vocabulary in every process.
    let trained = tokenizer.get_vocab(false);
    let mut alphabet: Vec<&String> = trained
        .keys()
        .filter(|t| {
            let piece = t.strip_prefix("##").unwrap_or(t);
            piece.chars().count() == 1 && !SPECIALS.contains(&t.as_str())
        })
        .collect();
    alphabet.sort();
    let mut words: Vec<String> = texts
        .iter()
        .flat_map(|t| bert_words(t))
        .filter(|w| w.chars().count() > 1)
        .collect();
    words.sort();
    words.dedup();
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for t in SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain(alphabet.into_iter().cloned())
        .chain(words)
    {
        let next = vocab.len() as u32;
        vocab.entry(t).or_insert(next);
    }
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(tok_err)?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(BertNormalizer::default()));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(WordPieceDecoder::default()));
    let id = |t: &str| tokenizer.token_to_id(t).unwrap_or(0);
    let post = BertProcessing::new(("[SEP]".into(), id("[SEP]")), ("[CLS]".into(), id("[CLS]")));
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

/// The words BERT's basic tokenizer makes of `text` for English: lower-cased, split at
/// whitespace, every punctuation character a word of its own.
fn bert_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    for c in text.to_lowercase().chars() {
        if c.is_whitespace() || c.is_ascii_punctuation() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            if c.is_ascii_punctuation() {
                words.push(c.to_string());
            }
        } else {
            word.push(c);
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Writes a tiny sentence-transformers model (config.json, model.safetensors, tokenizer.json,
/// vocab.txt, tokenizer_config.json, modules.json, pooling and sentence_bert_config.json) to
/// `dir`, with a vocabulary trained on `texts`.
pub fn write_tiny_model(dir: &Path, texts: &[&str], spec: &TinySpec) -> Result<(), EmbedError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EmbedError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tokenizer = train_wordpiece(texts, spec.vocab_size)?;
    let tok_path = dir.join("tokenizer.json");
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| EmbedError::TinyModel {
            message: format!("{}: {e}", tok_path.display()),
        })?;
    let mut vocab: Vec<(String, u32)> = tokenizer.get_vocab(true).into_iter().collect();
    vocab.sort_by_key(|(_, id)| *id);
    let vocab_txt: String = vocab.iter().map(|(t, _)| format!("{t}\n")).collect();
    let vocab_path = dir.join("vocab.txt");
    std::fs::write(&vocab_path, vocab_txt).map_err(io(&vocab_path))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({"tokenizer_class": "BertTokenizer", "do_lower_case": true,
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": spec.max_positions}),
    )?;
    let cfg: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": vocab.len(), "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_positions,
    }))
    .map_err(|e| EmbedError::TinyModel {
        message: e.to_string(),
    })?;
    write_json(&dir.join("config.json"), &cfg.to_hf_json())?;
    let bert = Bert::random(&cfg, &mut Rng::new(spec.seed), &Device::Cpu)?;
    save_safetensors(&dir.join("model.safetensors"), &bert.export_tensors()?)?;
    SentenceConfig {
        pooling: spec.pooling,
        normalize: spec.normalize,
        max_seq_length: spec.max_positions,
    }
    .write_to(dir, spec.hidden_size)?;
    Ok(())
}

/// A small English corpus about animals, food and places for tests and examples.
pub fn sample_texts() -> Vec<String> {
    let animals = [
        "cat", "dog", "horse", "eagle", "salmon", "rabbit", "owl", "fox",
    ];
    let foods = [
        "fish", "seeds", "grass", "mice", "berries", "insects", "carrots", "worms",
    ];
    let places = [
        "forest", "river", "barn", "mountain", "garden", "desert", "lake", "field",
    ];
    let mut out = Vec::new();
    for (i, a) in animals.iter().enumerate() {
        for (j, f) in foods.iter().enumerate() {
            let p = places[(i + j) % places.len()];
            out.push(format!("the {a} eats {f} near the {p}"));
            out.push(format!("where does the {a} find {f}?"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_is_the_same_every_time() {
        // The trainer's own tie-breaking follows hash order, which changes between hash maps
        // (and processes): ten trainings must still give one vocabulary.
        let texts = sample_texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let first = train_wordpiece(&refs, 400).unwrap().get_vocab(true);
        for _ in 0..10 {
            assert_eq!(train_wordpiece(&refs, 400).unwrap().get_vocab(true), first);
        }
        let tok = train_wordpiece(&refs, 400).unwrap();
        let pieces = tok.encode("The cat eats fish, Zebra", false).unwrap();
        // Whole words are single tokens; an unseen character is unknown.
        assert_eq!(
            pieces.get_tokens(),
            ["the", "cat", "eats", "fish", "[UNK]", "[UNK]"]
        );
    }

    #[test]
    fn tiny_model_directory_is_complete_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let texts = sample_texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        write_tiny_model(dir.path(), &refs, &TinySpec::default()).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "vocab.txt",
            "modules.json",
            "1_Pooling/config.json",
            "sentence_bert_config.json",
        ] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        let enc = crate::embed::SentenceEncoder::load_dir(dir.path(), &Device::Cpu).unwrap();
        let tok = enc.tokenizer().inner();
        assert_eq!(tok.token_to_id("[PAD]"), Some(0));
        let e = enc.encode(&["the cat eats fish", "an owl"], 8).unwrap();
        assert_eq!((e.len(), e[0].len()), (2, 32));
        let norm: f32 = e[0].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        assert_ne!(e[0], e[1]);
    }
}
