//! Tiny random GGUF instruct models of every architecture the built-in generator runs, with the
//! metadata, tensor names and tokenizer layout real files have (llama.cpp's conversion). Tests
//! build them in a few milliseconds to load, run and cross-check each family without downloads.
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::arch::Architecture;

/// Hidden width of the tiny models.
const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 64;
const LAYERS: usize = 2;
const CONTEXT: u32 = 512;

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the rest are shifted.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut shifted = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap()
            }
        })
        .collect()
}

struct Vocabulary {
    entries: Vec<(String, Value)>,
    tokens: usize,
}

/// Byte-level BPE (llama/SmolLM2, Qwen): the 256 byte characters, a few merges, ChatML markers.
fn byte_level_vocab(pre: &str, chat: &[&str]) -> Vocabulary {
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "o n"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![1i32; tokens.len()];
    for t in chat {
        tokens.push(t.to_string());
        types.push(3);
    }
    let n = tokens.len();
    Vocabulary {
        tokens: n,
        entries: vec![
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".into(), strings(&tokens)),
            (
                "tokenizer.ggml.merges".into(),
                strings(&merges.map(String::from)),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.eos_token_id".into(),
                Value::U32((n - 1) as u32),
            ),
        ],
    }
}

/// SentencePiece BPE (Gemma, Phi-3): unk, BOS, EOS, the 256 byte tokens, pieces, chat markers.
fn sentencepiece_vocab(chat: &[&str], add_space_prefix: bool) -> Vocabulary {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    let mut scores = vec![0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let mut pieces: Vec<String> = vec!["▁".into()];
    pieces.extend(('a'..='z').map(String::from));
    pieces.extend(["▁t", "he", "▁the", "in", "on", "▁a"].map(String::from));
    for (i, p) in pieces.into_iter().enumerate() {
        tokens.push(p);
        types.push(1);
        scores.push(-(i as f32));
    }
    for t in chat {
        tokens.push(t.to_string());
        types.push(3);
        scores.push(0.0);
    }
    Vocabulary {
        tokens: tokens.len(),
        entries: vec![
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            ("tokenizer.ggml.tokens".into(), strings(&tokens)),
            (
                "tokenizer.ggml.scores".into(),
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
            (
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(add_space_prefix),
            ),
        ],
    }
}

fn strings(items: &[String]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.clone())).collect())
}

/// Writes a tiny random instruct model of `arch` to `path`. Deterministic for a seed.
pub fn write_tiny_gguf(arch: Architecture, path: &Path, seed: u64) -> candle_core::Result<()> {
    let (vocab, template) = match arch {
        Architecture::Llama => (
            byte_level_vocab("smollm", &["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        ),
        Architecture::Qwen2 => (
            byte_level_vocab("qwen2", &["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        ),
        Architecture::Qwen3 => (
            byte_level_vocab("qwen2", &["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
            "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}<|im_start|>",
        ),
        Architecture::Gemma3 => (
            sentencepiece_vocab(&["<start_of_turn>", "<end_of_turn>"], false),
            "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}",
        ),
        Architecture::Phi3 => (
            sentencepiece_vocab(&["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], true),
            "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}",
        ),
    };
    let p = arch.gguf_name();
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(p.into())),
        ("general.name".into(), Value::String(format!("tiny-{p}"))),
        (
            "tokenizer.chat_template".into(),
            Value::String(template.into()),
        ),
        (format!("{p}.context_length"), Value::U32(CONTEXT)),
        (format!("{p}.embedding_length"), Value::U32(HIDDEN as u32)),
        (format!("{p}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{p}.feed_forward_length"), Value::U32(FFN as u32)),
        (
            format!("{p}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{p}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (
            format!("{p}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{p}.rope.freq_base"), Value::F32(10_000.0)),
        (
            format!("{p}.rope.dimension_count"),
            Value::U32(HEAD_DIM as u32),
        ),
    ];
    if matches!(arch, Architecture::Qwen3 | Architecture::Gemma3) {
        meta.push((
            format!("{p}.attention.key_length"),
            Value::U32(HEAD_DIM as u32),
        ));
        meta.push((
            format!("{p}.attention.value_length"),
            Value::U32(HEAD_DIM as u32),
        ));
    }
    if arch == Architecture::Gemma3 {
        meta.push((format!("{p}.attention.sliding_window"), Value::U32(64)));
    }
    if arch == Architecture::Qwen3 {
        meta.push(("general.dtype".into(), Value::U32(0)));
    }
    meta.extend(vocab.entries);

    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut random = |shape: &[usize], scale: f32| -> candle_core::Result<QTensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        QTensor::quantize(
            &Tensor::from_vec(data, shape, &Device::Cpu)?,
            GgmlDType::F32,
        )
    };
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?,
            GgmlDType::F32,
        )
    };
    let q = HEADS * HEAD_DIM;
    let kv = KV_HEADS * HEAD_DIM;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            random(&[vocab.tokens, HIDDEN], 1.0)?,
        ),
        ("output_norm.weight".into(), ones(HIDDEN)?),
        (
            "output.weight".into(),
            random(&[vocab.tokens, HIDDEN], 0.5)?,
        ),
    ];
    for layer in 0..LAYERS {
        let b = format!("blk.{layer}");
        tensors.push((format!("{b}.attn_norm.weight"), ones(HIDDEN)?));
        tensors.push((format!("{b}.ffn_norm.weight"), ones(HIDDEN)?));
        tensors.push((
            format!("{b}.attn_output.weight"),
            random(&[HIDDEN, q], 0.3)?,
        ));
        tensors.push((format!("{b}.ffn_down.weight"), random(&[HIDDEN, FFN], 0.3)?));
        if arch == Architecture::Phi3 {
            tensors.push((
                format!("{b}.attn_qkv.weight"),
                random(&[q + 2 * kv, HIDDEN], 0.3)?,
            ));
            tensors.push((
                format!("{b}.ffn_up.weight"),
                random(&[2 * FFN, HIDDEN], 0.3)?,
            ));
            continue;
        }
        tensors.push((format!("{b}.attn_q.weight"), random(&[q, HIDDEN], 0.3)?));
        tensors.push((format!("{b}.attn_k.weight"), random(&[kv, HIDDEN], 0.3)?));
        tensors.push((format!("{b}.attn_v.weight"), random(&[kv, HIDDEN], 0.3)?));
        tensors.push((format!("{b}.ffn_gate.weight"), random(&[FFN, HIDDEN], 0.3)?));
        tensors.push((format!("{b}.ffn_up.weight"), random(&[FFN, HIDDEN], 0.3)?));
        if arch == Architecture::Qwen2 {
            tensors.push((format!("{b}.attn_q.bias"), random(&[q], 0.1)?));
            tensors.push((format!("{b}.attn_k.bias"), random(&[kv], 0.1)?));
            tensors.push((format!("{b}.attn_v.bias"), random(&[kv], 0.1)?));
        }
        if matches!(arch, Architecture::Qwen3 | Architecture::Gemma3) {
            tensors.push((format!("{b}.attn_q_norm.weight"), ones(HEAD_DIM)?));
            tensors.push((format!("{b}.attn_k_norm.weight"), ones(HEAD_DIM)?));
        }
        if arch == Architecture::Gemma3 {
            tensors.push((format!("{b}.post_attention_norm.weight"), ones(HIDDEN)?));
            tensors.push((format!("{b}.post_ffw_norm.weight"), ones(HIDDEN)?));
        }
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path)?;
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)
}
