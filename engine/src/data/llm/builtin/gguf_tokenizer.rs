//! Tokenizers built from a GGUF file's metadata, as llama.cpp reads them:
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE from `tokens` and `merges` (SmolLM2, Llama 3,
//!   Qwen2/3), with the pre-tokenizer `tokenizer.ggml.pre` names;
//! - `tokenizer.ggml.model = "llama"`: SentencePiece BPE from `tokens` and `scores` (Gemma, Phi-3,
//!   Llama 2, Mistral): merges ranked by the merged piece's score, `<0xNN>` byte fallback, `▁` for
//!   spaces.
//!
//! Control tokens (`token_type` 3) become special tokens: never split, dropped when decoding.
//! User-defined tokens (type 4) are never split but are kept when decoding.
use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use super::err;
use crate::data::llm::LlmError;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// Qwen2's pre-tokenizer split (`tokenizer.ggml.pre = "qwen2"`): single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's (`"llama-bpe"`): digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, LlmError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| err(format!("GGUF metadata has no {key}")))
}

fn strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>, LlmError> {
    meta(ct, key)?
        .to_vec()
        .map_err(|e| err(format!("{key}: {e}")))?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| err(format!("{key}: {e}")))
        })
        .collect()
}

fn token_types(ct: &gguf_file::Content, n: usize) -> Option<Vec<i32>> {
    let values = ct
        .metadata
        .get("tokenizer.ggml.token_type")?
        .to_vec()
        .ok()?;
    let types: Vec<i32> = values.iter().filter_map(|v| v.to_i32().ok()).collect();
    (types.len() == n).then_some(types)
}

/// Builds the tokenizer a GGUF file describes.
pub fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer, LlmError> {
    let kind = meta(ct, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| err(e.to_string()))?
        .clone();
    let tokens = strings(ct, "tokenizer.ggml.tokens")?;
    let types = token_types(ct, tokens.len());
    let mut tokenizer = match kind.as_str() {
        "gpt2" => byte_level_bpe(ct, &tokens)?,
        "llama" => sentencepiece_bpe(ct, &tokens, types.as_deref())?,
        other => {
            return Err(err(format!(
                "GGUF tokenizer model {other:?} is not supported (byte-level BPE \"gpt2\" and SentencePiece BPE \"llama\" are)"
            )))
        }
    };
    // Tokens that must never be split.
    let (control, user): (Vec<AddedToken>, Vec<AddedToken>) = match &types {
        Some(types) => (
            select(&tokens, types, TYPE_CONTROL, true),
            select(&tokens, types, TYPE_USER_DEFINED, false),
        ),
        // No types: the ChatML-style markers are the control tokens.
        None => (
            tokens
                .iter()
                .filter(|n| n.starts_with("<|") && n.ends_with("|>"))
                .map(|n| AddedToken::from(n.clone(), true))
                .collect(),
            Vec::new(),
        ),
    };
    tokenizer.add_special_tokens(&control);
    tokenizer.add_tokens(&user);
    Ok(tokenizer)
}

fn select(tokens: &[String], types: &[i32], wanted: i32, special: bool) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(types)
        .filter(|(t, ty)| **ty == wanted && !t.is_empty())
        .map(|(t, _)| AddedToken::from(t.clone(), special))
        .collect()
}

fn vocab_of(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        // A duplicated piece keeps its first id, as llama.cpp's token-to-id map does.
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    vocab
}

fn byte_level_bpe(ct: &gguf_file::Content, tokens: &[String]) -> Result<Tokenizer, LlmError> {
    let merges: Vec<(String, String)> = strings(ct, "tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), merges)
        .build()
        .map_err(|e| err(format!("cannot build the GGUF tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, LlmError> {
        Ok(Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| err(format!("pre-tokenizer pattern: {e}")))?
        .into())
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        "qwen2" => PreSequence::new(vec![
            split(QWEN2_SPLIT)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        "llama-bpe" | "llama3" => PreSequence::new(vec![
            split(LLAMA3_SPLIT)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        "smollm" => PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        // GPT-2's own split, what "gpt2" and older files mean.
        _ => ByteLevel::new(false, true, true).into(),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

/// SentencePiece BPE: a pair merges when the merged piece is in the vocabulary; the higher the
/// merged piece's score, the earlier (what llama.cpp's SPM tokenizer and HF's converter do).
fn sentencepiece_bpe(
    ct: &gguf_file::Content,
    tokens: &[String],
    types: Option<&[i32]>,
) -> Result<Tokenizer, LlmError> {
    let scores: Vec<f32> = match ct.metadata.get("tokenizer.ggml.scores") {
        Some(v) => v
            .to_vec()
            .map_err(|e| err(format!("tokenizer.ggml.scores: {e}")))?
            .iter()
            .map(|s| s.to_f32().unwrap_or(0.0))
            .collect(),
        // No scores: earlier ids merge first.
        None => (0..tokens.len()).map(|i| -(i as f32)).collect(),
    };
    if scores.len() != tokens.len() {
        return Err(err(format!(
            "GGUF tokenizer has {} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let vocab = vocab_of(tokens);
    let mergeable = |id: usize| types.is_none_or(|t| t[id] == TYPE_NORMAL);
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new(); // (score, merged id, split char)
    for (id, piece) in tokens.iter().enumerate() {
        if !mergeable(id) || piece.chars().count() < 2 {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                ranked.push((scores[id], id, split));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut seen = HashSet::new();
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .filter_map(|(_, id, split)| {
            let (l, r) = tokens[id].split_at(split);
            seen.insert((l, r)).then(|| (l.to_string(), r.to_string()))
        })
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    let unk = ct
        .metadata
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|id| tokens.get(id as usize).cloned())
        .or_else(|| vocab.contains_key("<unk>").then(|| "<unk>".to_string()));
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| err(format!("cannot build the GGUF tokenizer: {e}")))?;
    let has_bytes = types.is_none_or(|t| t.contains(&TYPE_BYTE));
    if !has_bytes {
        tracing::warn!("GGUF SentencePiece vocabulary has no <0xNN> byte tokens: unknown characters become <unk>");
    }
    let add_space_prefix = ct
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    // llama.cpp puts the space prefix before every text fragment that follows a control token
    // (or starts the input), whatever it begins with: a normalizer does the same per fragment.
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(
        Replace::new(" ", "▁")
            .map_err(|e| err(format!("normalizer: {e}")))?
            .into(),
    );
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    // As HF's Llama tokenizers decode: spaces back, bytes to characters, one string, and the
    // space prefix off again.
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ")
            .map_err(|e| err(format!("decoder: {e}")))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tok)
}

/// Token ids by piece, for the template's markers.
pub fn ids_of(tokenizer: &Tokenizer, pieces: &[&str]) -> HashMap<String, u32> {
    pieces
        .iter()
        .filter_map(|p| tokenizer.token_to_id(p).map(|id| (p.to_string(), id)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value;

    fn content(entries: Vec<(&str, Value)>) -> gguf_file::Content {
        gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    fn strs(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A SentencePiece vocabulary: control tokens, the 256 byte tokens, then pieces with scores.
    fn spm(add_space_prefix: bool) -> Tokenizer {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, TYPE_CONTROL, TYPE_CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TYPE_BYTE);
        }
        let pieces = [
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("ll", -3.0),
            ("▁h", -4.0),
            ("llo", -5.0),
            ("▁he", -6.0),
            ("▁hello", -7.0),
            ("▁w", -8.0),
            ("or", -8.5),
            ("▁wor", -9.0),
        ];
        let mut scores = vec![0.0f32; tokens.len()];
        for (p, s) in pieces {
            tokens.push(p.into());
            types.push(TYPE_NORMAL);
            scores.push(s);
        }
        tokens.push("<start_of_turn>".into());
        types.push(TYPE_CONTROL);
        scores.push(0.0);
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        tokenizer_from_gguf(&content(vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strs(&token_refs)),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            (
                "tokenizer.ggml.add_space_prefix",
                Value::Bool(add_space_prefix),
            ),
        ]))
        .unwrap()
    }

    fn pieces(tok: &Tokenizer, text: &str) -> Vec<String> {
        tok.encode(text, false).unwrap().get_tokens().to_vec()
    }

    #[test]
    fn sentencepiece_merges_by_score_with_byte_fallback() {
        let tok = spm(true);
        assert_eq!(pieces(&tok, "hello"), ["▁hello"]);
        assert_eq!(pieces(&tok, "hello world"), ["▁hello", "▁wor", "l", "d"]);
        // é is not a piece: its two UTF-8 bytes.
        assert_eq!(pieces(&tok, "hé"), ["▁h", "<0xC3>", "<0xA9>"]);
        // Control tokens are never split; the text after one gets the space prefix, as in
        // llama.cpp.
        assert_eq!(
            pieces(&tok, "<start_of_turn>hello"),
            ["<start_of_turn>", "▁hello"]
        );
        // Leading spaces keep the prefix too.
        assert_eq!(pieces(&tok, " hello"), ["▁", "▁hello"]);
        let ids = tok.encode("hello world hé", false).unwrap();
        assert_eq!(tok.decode(ids.get_ids(), true).unwrap(), "hello world hé");
        let no_prefix = spm(false);
        assert_eq!(pieces(&no_prefix, "hello"), ["h", "e", "llo"]);
    }

    #[test]
    fn byte_level_bpe_with_qwen2_pre_tokenizer_splits_digits() {
        // A tiny byte-level vocabulary: the bytes a, b, 1, 2, Ġ (space) and merges "a b", "1 2".
        let tokens = ["a", "b", "1", "2", "Ġ", "ab", "12", "<|im_start|>"];
        let make = |pre: &str| {
            tokenizer_from_gguf(&content(vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.pre", Value::String(pre.into())),
                ("tokenizer.ggml.tokens", strs(&tokens)),
                ("tokenizer.ggml.merges", strs(&["a b", "1 2"])),
            ]))
            .unwrap()
        };
        assert_eq!(pieces(&make("gpt2"), "ab 12"), ["ab", "Ġ", "12"]);
        // Qwen2 splits numbers into single digits before merging.
        assert_eq!(pieces(&make("qwen2"), "ab 12"), ["ab", "Ġ", "1", "2"]);
        assert_eq!(
            pieces(&make("qwen2"), "<|im_start|>ab"),
            ["<|im_start|>", "ab"]
        );
        let tok = make("qwen2");
        let ids = tok.encode("ab 12", false).unwrap();
        assert_eq!(tok.decode(ids.get_ids(), true).unwrap(), "ab 12");
    }

    #[test]
    fn unknown_tokenizer_model_is_named() {
        let e = tokenizer_from_gguf(&content(vec![
            ("tokenizer.ggml.model", Value::String("rwkv".into())),
            ("tokenizer.ggml.tokens", strs(&["a"])),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("\"rwkv\""), "{e}");
    }
}
