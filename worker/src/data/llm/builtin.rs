//! The built-in generator: a small instruct model run in-process from a GGUF file with
//! candle-transformers' quantized llama, so a machine without any LLM server still writes real
//! questions. SmolLM2-135M-Instruct (Apache-2.0) is the default model.
//!
//! The tokenizer is built from the GGUF metadata (`tokenizer.ggml.tokens` and
//! `tokenizer.ggml.merges`, byte-level BPE); prompts use the ChatML template
//! (`<|im_start|>role ... <|im_end|>`) that SmolLM2 and Qwen models share. This build runs the
//! `llama` architecture; a GGUF of another `general.architecture` is refused with a clear error.
//! There is no constrained decoding: the prompt describes the answer's format.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::quantized_llama::ModelWeights;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{AddedToken, Tokenizer};

use super::{
    BackendInfo, ChatReply, ChatRequest, LlmBackend, LlmError, ThroughputMeter, ThroughputStats,
};

/// Where the default model's GGUF comes from, for error messages.
pub const FETCH_HINT: &str = "fetch SmolLM2-135M-Instruct with `bash ../shared/tools/fetch-smollm2.sh models/smollm2-135m-instruct` (or `ragd-worker models pull`), then pass --gguf models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

fn err(message: impl Into<String>) -> LlmError {
    LlmError::Builtin {
        message: message.into(),
    }
}

struct Loaded {
    model: ModelWeights,
    tokenizer: Tokenizer,
    stop: Vec<u32>,
    context: usize,
}

/// The in-process backend.
pub struct BuiltinBackend {
    loaded: Arc<Mutex<Loaded>>,
    path: PathBuf,
    meter: ThroughputMeter,
}

impl std::fmt::Debug for BuiltinBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinBackend")
            .field("path", &self.path)
            .finish()
    }
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, LlmError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| err(format!("GGUF metadata has no {key}")))
}

/// Builds the byte-level BPE tokenizer a GGUF file describes.
pub fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer, LlmError> {
    let kind = meta(ct, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| err(e.to_string()))?;
    if kind != "gpt2" {
        return Err(err(format!(
            "GGUF tokenizer model {kind:?} is not supported (byte-level BPE, \"gpt2\", is)"
        )));
    }
    let tokens = meta(ct, "tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(|e| err(e.to_string()))?;
    let merges = meta(ct, "tokenizer.ggml.merges")?
        .to_vec()
        .map_err(|e| err(e.to_string()))?;
    let mut vocab = Vocab::default();
    let mut names = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let s = t.to_string().map_err(|e| err(e.to_string()))?.clone();
        vocab.insert(s.clone(), i as u32);
        names.push(s);
    }
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| m.to_string().ok())
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| err(format!("cannot build the GGUF tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true),
    ));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    // Control tokens (<|im_start|>, <|endoftext|>, ...) must never be split.
    let special: Vec<AddedToken> = names
        .iter()
        .filter(|n| n.starts_with("<|") && n.ends_with("|>"))
        .map(|n| AddedToken::from(n.clone(), true))
        .collect();
    tok.add_special_tokens(&special);
    Ok(tok)
}

/// How the built-in model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinOptions {
    /// Dequantise all weights to f32 at load. candle 0.11 has no SIMD kernel for Q4_1 (the
    /// SmolLM2 file's type), so this is about 5x faster, at 4 bytes per parameter of memory
    /// (about 540 MB for SmolLM2-135M). Done through candle's `CANDLE_DEQUANTIZE_ALL` switch,
    /// set only while a dedicated loader thread reads the weights.
    pub dequantize: bool,
}

impl Default for BuiltinOptions {
    fn default() -> Self {
        Self { dequantize: true }
    }
}

impl BuiltinBackend {
    /// Loads a GGUF model with default options. Blocking: call from a blocking thread.
    pub fn load(path: &Path) -> Result<Self, LlmError> {
        Self::load_with(path, BuiltinOptions::default())
    }

    /// Loads a GGUF model. Blocking (reads and possibly dequantises weights).
    pub fn load_with(path: &Path, options: BuiltinOptions) -> Result<Self, LlmError> {
        const SWITCH: &str = "CANDLE_DEQUANTIZE_ALL";
        let set_here = options.dequantize && std::env::var_os(SWITCH).is_none();
        if set_here {
            std::env::set_var(SWITCH, "1");
        }
        // candle reads the switch once per thread: a fresh thread sees it.
        let owned = path.to_path_buf();
        let result = std::thread::spawn(move || Self::load_inner(&owned))
            .join()
            .unwrap_or_else(|_| Err(err("the model loader thread panicked")));
        if set_here {
            std::env::remove_var(SWITCH);
        }
        result
    }

    fn load_inner(path: &Path) -> Result<Self, LlmError> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| err(format!("cannot open {}: {e}; {FETCH_HINT}", path.display())))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| err(format!("{} is not a GGUF file: {e}", path.display())))?;
        let arch = meta(&ct, "general.architecture")?
            .to_string()
            .map_err(|e| err(e.to_string()))?
            .clone();
        if arch != "llama" {
            return Err(err(format!(
                "{}: architecture {arch:?} is not supported by this build's built-in generator (llama is, e.g. SmolLM2); serve that model with Ollama or an OpenAI-compatible server instead",
                path.display()
            )));
        }
        let tokenizer = tokenizer_from_gguf(&ct)?;
        let context = meta(&ct, "llama.context_length")
            .and_then(|v| v.to_u32().map_err(|e| err(e.to_string())))
            .unwrap_or(2048)
            .min(4096) as usize;
        let mut stop: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        if let Ok(eos) = meta(&ct, "tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().map_err(|e| err(e.to_string())))
        {
            stop.push(eos);
        }
        if tokenizer.token_to_id("<|im_start|>").is_none() {
            return Err(err(format!(
                "{}: the model has no ChatML tokens (<|im_start|>); the built-in generator needs a ChatML instruct model such as SmolLM2-Instruct",
                path.display()
            )));
        }
        let model = ModelWeights::from_gguf(ct, &mut file, &Device::Cpu)
            .map_err(|e| err(format!("cannot load {}: {e}", path.display())))?;
        tracing::info!(path = %path.display(), context, "built-in model loaded");
        Ok(Self {
            loaded: Arc::new(Mutex::new(Loaded {
                model,
                tokenizer,
                stop,
                context,
            })),
            path: path.to_path_buf(),
            meter: ThroughputMeter::default(),
        })
    }
}

/// The ChatML prompt for a request. There is no constrained decoding and the JSON schema is not
/// spelled out either (small models echo it back instead of answering): the prompt itself must
/// describe the answer's format, as the default prompts do, and the parser is tolerant.
pub fn chatml_prompt(req: &ChatRequest) -> String {
    let user = &req.user;
    let mut s = String::new();
    if let Some(system) = &req.system {
        s.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
    }
    s.push_str(&format!(
        "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    ));
    s
}

fn generate(loaded: &mut Loaded, req: &ChatRequest) -> Result<ChatReply, LlmError> {
    let start = Instant::now();
    let enc = loaded
        .tokenizer
        .encode(chatml_prompt(req).as_str(), false)
        .map_err(|e| err(format!("tokenizing the prompt failed: {e}")))?;
    let mut prompt: Vec<u32> = enc.get_ids().to_vec();
    let budget = loaded
        .context
        .saturating_sub(req.max_tokens as usize)
        .max(16);
    if prompt.len() > budget {
        // Keep the end: the passage's tail and the assistant header.
        prompt.drain(..prompt.len() - budget);
    }
    let temperature = (req.temperature > 0.0).then_some(req.temperature as f64);
    let mut sampler = LogitsProcessor::new(req.seed.unwrap_or(0), temperature, Some(0.9));
    let dev = Device::Cpu;
    let ce = |e: candle_core::Error| err(e.to_string());
    let input = Tensor::new(prompt.as_slice(), &dev)
        .and_then(|t| t.unsqueeze(0))
        .map_err(ce)?;
    let logits = loaded
        .model
        .forward(&input, 0)
        .and_then(|l| l.squeeze(0))
        .map_err(ce)?;
    let mut next = sampler.sample(&logits).map_err(ce)?;
    let gen_start = Instant::now();
    let mut out = Vec::new();
    let mut hit_limit = true;
    for i in 0..req.max_tokens as usize {
        if loaded.stop.contains(&next) {
            hit_limit = false;
            break;
        }
        out.push(next);
        if prompt.len() + i + 1 >= loaded.context {
            break;
        }
        let input = Tensor::new(&[next], &dev)
            .and_then(|t| t.unsqueeze(0))
            .map_err(ce)?;
        let logits = loaded
            .model
            .forward(&input, prompt.len() + i)
            .and_then(|l| l.squeeze(0))
            .map_err(ce)?;
        next = sampler.sample(&logits).map_err(ce)?;
    }
    let text = loaded
        .tokenizer
        .decode(&out, true)
        .map_err(|e| err(format!("decoding failed: {e}")))?;
    Ok(ChatReply {
        text,
        prompt_tokens: Some(prompt.len() as u64),
        completion_tokens: Some(out.len() as u64),
        generation_time: Some(gen_start.elapsed().max(Duration::from_nanos(1))),
        wall_time: start.elapsed(),
        hit_token_limit: hit_limit,
    })
}

#[async_trait::async_trait]
impl LlmBackend for BuiltinBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: "builtin".into(),
            model: self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            endpoint: None,
        }
    }

    async fn check(&self) -> Result<(), LlmError> {
        Ok(())
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatReply, LlmError> {
        let loaded = self.loaded.clone();
        let req = request.clone();
        let reply = tokio::task::spawn_blocking(move || {
            let mut guard = loaded.lock().map_err(|_| err("model lock poisoned"))?;
            generate(&mut guard, &req)
        })
        .await
        .map_err(|e| err(format!("generation thread failed: {e}")))??;
        self.meter.record(&reply);
        Ok(reply)
    }

    fn stats(&self) -> ThroughputStats {
        self.meter.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_prompt_has_roles_and_schema() {
        let p = chatml_prompt(&ChatRequest {
            system: Some("sys".into()),
            user: "question please".into(),
            schema: Some(serde_json::json!({"type": "object"})),
            temperature: 0.0,
            seed: None,
            max_tokens: 4,
        });
        assert!(
            p.starts_with("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nquestion please")
        );
        assert!(
            !p.contains("\"type\""),
            "the schema is not echoed into the prompt"
        );
        assert!(p.ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn missing_file_says_how_to_fetch() {
        let e = BuiltinBackend::load(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(e.to_string().contains("fetch-smollm2.sh"), "{e}");
    }
}
