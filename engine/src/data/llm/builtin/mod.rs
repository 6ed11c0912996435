//! The built-in generator: a small instruct model run in-process from a GGUF file with
//! candle-transformers' quantized models, so a machine without any LLM server still writes real
//! questions. SmolLM2-135M-Instruct (Apache-2.0) is the default model; any GGUF of a family in
//! [`arch::Architecture`] (llama, qwen2, qwen3, gemma3, phi3; chosen from the file's
//! `general.architecture`) can replace it.
//!
//! The tokenizer is built from the GGUF metadata ([`gguf_tokenizer`]); the prompt format is
//! recognised from the file's chat template ([`chat`]). There is no constrained decoding: the
//! prompt describes the answer's format and the parser is tolerant.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::Device;
use candle_transformers::generation::LogitsProcessor;
use tokenizers::Tokenizer;

pub mod arch;
pub mod chat;
pub mod gguf_tokenizer;
pub mod tiny_gguf;

use arch::{ArchModel, Architecture, MAX_CONTEXT};
use chat::ChatFormat;
pub use gguf_tokenizer::tokenizer_from_gguf;

use super::{
    BackendInfo, ChatReply, ChatRequest, LlmBackend, LlmError, ThroughputMeter, ThroughputStats,
};

/// Where the default model's GGUF comes from, for error messages.
pub const FETCH_HINT: &str = "get a model with `ragd-worker models pull smollm2-135m` (or, without the hub, `scripts/fetch-models.sh smollm2`), then pass --gguf smollm2-135m (or the .gguf path)";

pub(crate) fn err(message: impl Into<String>) -> LlmError {
    LlmError::Builtin {
        message: message.into(),
    }
}

struct Loaded {
    model: ArchModel,
    tokenizer: Tokenizer,
    format: ChatFormat,
    /// Prepended to every prompt when the file asks for it (`tokenizer.ggml.add_bos_token`).
    bos: Option<u32>,
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

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    ct.metadata.get(key)
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    meta(ct, key).and_then(|v| v.to_u32().ok())
}

/// The tokenizer of a GGUF file, without loading its weights.
pub fn tokenizer_from_gguf_file(path: &Path) -> Result<Tokenizer, LlmError> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    let ct = gguf_file::Content::read(&mut file)
        .map_err(|e| err(format!("{} is not a GGUF file: {e}", path.display())))?;
    tokenizer_from_gguf(&ct)
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
        let name = meta(&ct, "general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| {
                err(format!(
                    "{}: GGUF metadata has no general.architecture",
                    path.display()
                ))
            })?;
        let arch = Architecture::from_gguf_name(&name).ok_or_else(|| {
            err(format!(
                "{}: architecture {name:?} is not supported by the built-in generator (it runs {}); serve that model with Ollama or an OpenAI-compatible server instead",
                path.display(),
                Architecture::supported_list()
            ))
        })?;
        let tokenizer =
            tokenizer_from_gguf(&ct).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let template = meta(&ct, "tokenizer.chat_template").and_then(|v| v.to_string().ok());
        let format = ChatFormat::detect(template.map(String::as_str), &tokenizer)
            .ok_or_else(|| {
                err(format!(
                    "{}: not a chat model the built-in generator knows: its chat template uses none of the ChatML, Gemma, Llama 3 or Phi-3 turn markers; use an instruct model (such as SmolLM2-Instruct) or serve it with Ollama",
                    path.display()
                ))
            })?;
        if let Some(missing) = format
            .markers()
            .iter()
            .find(|m| tokenizer.token_to_id(m).is_none())
        {
            return Err(err(format!(
                "{}: its chat format ({format:?}) needs the token {missing} that the vocabulary lacks",
                path.display()
            )));
        }
        let prefix = arch.metadata_prefix(&ct);
        let context = meta_u32(&ct, &format!("{prefix}.context_length"))
            .unwrap_or(2048)
            .min(MAX_CONTEXT as u32) as usize;
        let mut stop: Vec<u32> = format
            .stop_pieces()
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        stop.extend(meta_u32(&ct, "tokenizer.ggml.eos_token_id"));
        // SentencePiece vocabularies start prompts with BOS unless the file says otherwise.
        let spm = meta(&ct, "tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .is_some_and(|m| m == "llama");
        let add_bos = meta(&ct, "tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(spm);
        let bos = meta_u32(&ct, "tokenizer.ggml.bos_token_id").filter(|_| add_bos);
        let model = ArchModel::load(arch, ct, &mut file, &Device::Cpu)
            .map_err(|e| err(format!("cannot load {}: {e}", path.display())))?;
        tracing::info!(path = %path.display(), architecture = arch.gguf_name(), ?format, context, "built-in model loaded");
        Ok(Self {
            loaded: Arc::new(Mutex::new(Loaded {
                model,
                tokenizer,
                format,
                bos,
                stop,
                context,
            })),
            path: path.to_path_buf(),
            meter: ThroughputMeter::default(),
        })
    }
}

fn generate(loaded: &mut Loaded, req: &ChatRequest) -> Result<ChatReply, LlmError> {
    let start = Instant::now();
    let enc = loaded
        .tokenizer
        .encode(loaded.format.render(req).as_str(), false)
        .map_err(|e| err(format!("tokenizing the prompt failed: {e}")))?;
    let mut prompt: Vec<u32> = enc.get_ids().to_vec();
    let budget = loaded
        .context
        .saturating_sub(req.max_tokens as usize + 1)
        .max(16);
    if prompt.len() > budget {
        // Keep the end: the passage's tail and the assistant header.
        prompt.drain(..prompt.len() - budget);
    }
    if let Some(bos) = loaded.bos {
        prompt.insert(0, bos);
    }
    let temperature = (req.temperature > 0.0).then_some(req.temperature as f64);
    let mut sampler = LogitsProcessor::new(req.seed.unwrap_or(0), temperature, Some(0.9));
    let ce = |e: candle_core::Error| err(e.to_string());
    let logits = loaded.model.forward(&prompt, 0).map_err(ce)?;
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
        let logits = loaded
            .model
            .forward(&[next], prompt.len() + i)
            .map_err(ce)?;
        next = sampler.sample(&logits).map_err(ce)?;
    }
    let text = loaded
        .tokenizer
        .decode(&out, true)
        .map_err(|e| err(format!("decoding failed: {e}")))?;
    Ok(ChatReply {
        text: chat::strip_reasoning(&text).to_string(),
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

    fn request(max_tokens: u32) -> ChatRequest {
        ChatRequest {
            system: Some("You write questions.".into()),
            user: "the thin tin on the hill".into(),
            schema: None,
            temperature: 0.0,
            seed: Some(3),
            max_tokens,
        }
    }

    #[test]
    fn every_architecture_loads_generates_and_reuses_its_cache_correctly() {
        let dir = tempfile::tempdir().unwrap();
        for arch in Architecture::ALL {
            let path = dir.path().join(format!("{}.gguf", arch.gguf_name()));
            tiny_gguf::write_tiny_gguf(arch, &path, 11).unwrap();
            let backend = BuiltinBackend::load_with(&path, BuiltinOptions { dequantize: false })
                .unwrap_or_else(|e| panic!("{arch:?}: {e}"));
            let mut loaded = backend.loaded.lock().unwrap();
            let expected_format = match arch {
                Architecture::Llama | Architecture::Qwen2 => ChatFormat::ChatMl { no_think: false },
                Architecture::Qwen3 => ChatFormat::ChatMl { no_think: true },
                Architecture::Gemma3 => ChatFormat::Gemma,
                Architecture::Phi3 => ChatFormat::Phi3,
            };
            assert_eq!(loaded.format, expected_format, "{arch:?}");
            // SentencePiece files ask for BOS; byte-level ones here do not.
            assert_eq!(
                loaded.bos.is_some(),
                matches!(arch, Architecture::Gemma3 | Architecture::Phi3),
                "{arch:?}"
            );
            // The chat markers are single tokens, not split into pieces.
            let prompt = loaded.format.render(&request(1));
            let marker = loaded.format.markers()[0];
            let ids = loaded.tokenizer.encode(prompt.as_str(), false).unwrap();
            assert!(
                ids.get_tokens().iter().any(|t| t == marker),
                "{arch:?}: {:?}",
                ids.get_tokens()
            );
            let first = generate(&mut loaded, &request(12)).unwrap();
            assert!(first.completion_tokens.unwrap() > 0, "{arch:?}");
            // Greedy decoding twice gives the same answer: each request starts a fresh cache.
            let second = generate(&mut loaded, &request(12)).unwrap();
            assert_eq!(first.text, second.text, "{arch:?}");
            // Decoding one token at a time through the cache equals one pass over the sequence.
            let tokens: Vec<u32> = ids.get_ids().iter().copied().take(24).collect();
            let full = loaded.model.forward(&tokens, 0).unwrap();
            loaded
                .model
                .forward(&tokens[..tokens.len() - 3], 0)
                .unwrap();
            let mut step = None;
            for (i, t) in tokens.iter().enumerate().skip(tokens.len() - 3) {
                step = Some(loaded.model.forward(&[*t], i).unwrap());
            }
            let diff = (full - step.unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-3, "{arch:?}: cached decoding differs by {diff}");
        }
    }

    #[test]
    fn unsupported_architecture_names_the_supported_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let arch = gguf_file::Value::String("mamba".into());
        gguf_file::write(
            &mut std::fs::File::create(&path).unwrap(),
            &[("general.architecture", &arch)],
            &[],
        )
        .unwrap();
        let e = BuiltinBackend::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("\"mamba\"") && e.contains("qwen3, gemma3, phi3"),
            "{e}"
        );
        std::fs::write(&path, b"not a gguf at all").unwrap();
        let e = BuiltinBackend::load(&path).unwrap_err().to_string();
        assert!(e.contains("is not a GGUF file"), "{e}");
    }

    #[test]
    fn missing_file_says_how_to_fetch() {
        let e = BuiltinBackend::load(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(e.to_string().contains("models pull smollm2-135m"), "{e}");
    }
}
