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

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
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

/// How the built-in model keeps its weights in memory. Tensors of a type that candle 0.11
/// multiplies by with scalar code only (Q4_1, the SmolLM2 file's type, Q5_0 and Q5_1) are
/// converted at load; the rest stay as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Converted to f32: 4 bytes per weight, the fastest products over a prompt's many rows.
    /// SmolLM2's embedding, which is also its output layer, stays Q8_0: decoding multiplies by
    /// it once per token, and it is a fifth of the model.
    #[default]
    F32,
    /// Converted to Q8_0: 1.06 bytes per weight, so a decoded token (which reads every weight)
    /// is about twice as fast as with f32, but a prompt's rows about three times slower.
    Q8,
    /// Left as stored (scalar products, several times slower).
    AsStored,
}

/// How the built-in model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuiltinOptions {
    /// The weights' in-memory format.
    pub weights: WeightFormat,
}

impl BuiltinBackend {
    /// Loads a GGUF model with default options. Blocking: call from a blocking thread.
    pub fn load(path: &Path) -> Result<Self, LlmError> {
        Self::load_with(path, BuiltinOptions::default())
    }

    /// Loads a GGUF model. Blocking (reads and possibly converts weights).
    pub fn load_with(path: &Path, options: BuiltinOptions) -> Result<Self, LlmError> {
        let convert_to = match options.weights {
            WeightFormat::F32 => Some(GgmlDType::F32),
            WeightFormat::Q8 => Some(GgmlDType::Q8_0),
            WeightFormat::AsStored => None,
        };
        Self::load_inner(path, convert_to)
    }

    fn load_inner(path: &Path, convert_to: Option<GgmlDType>) -> Result<Self, LlmError> {
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
        let load_error =
            |e: candle_core::Error| err(format!("cannot load {}: {e}", path.display()));
        let slow = ct.tensor_infos.values().any(|t| lacks_simd(t.ggml_dtype));
        let model = if let Some(dtype) = convert_to.filter(|_| slow) {
            let (ct, mut weights) = converted(&ct, &mut file, dtype, |t| lacks_simd(t.ggml_dtype))
                .map_err(load_error)?;
            ArchModel::load(arch, ct, &mut weights, &Device::Cpu)
        } else {
            ArchModel::load(arch, ct, &mut file, &Device::Cpu)
        }
        .map_err(load_error)?;
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

/// Whether the answer so far already holds `wanted` usable questions, checked when its last token
/// ends one (has a `?`). Without constrained decoding a small model often goes on writing after
/// its questions (answers, more lists, commentary) until the token limit: what it writes after the
/// last wanted question is never used, and decoding it took most of a request's time.
fn holds_questions(tokenizer: &Tokenizer, out: &[u32], wanted: usize) -> bool {
    let Some(&last) = out.last() else {
        return false;
    };
    if !tokenizer
        .decode(&[last], false)
        .is_ok_and(|piece| piece.contains('?'))
    {
        return false;
    }
    tokenizer.decode(out, true).is_ok_and(|text| {
        super::parse::parse_questions(chat::strip_reasoning(&text))
            .questions
            .len()
            >= wanted
    })
}

/// Whether candle 0.11 multiplies by this type with scalar code only on x86-64.
fn lacks_simd(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// The file's content with every tensor that `which` picks converted to `dtype` (the model loads
/// with the types without a SIMD kernel in f32, or in Q8_0: rows of 32-weight blocks like the
/// types it replaces), as an in-memory GGUF to load the model from.
fn converted<R: std::io::Read + std::io::Seek>(
    ct: &gguf_file::Content,
    file: &mut R,
    dtype: GgmlDType,
    which: impl Fn(&gguf_file::TensorInfo) -> bool,
) -> candle_core::Result<(gguf_file::Content, std::io::Cursor<Vec<u8>>)> {
    let mut tensors = Vec::with_capacity(ct.tensor_infos.len());
    for (name, info) in &ct.tensor_infos {
        let stored = ct.tensor(file, name, &Device::Cpu)?;
        let tensor = if which(info) {
            QTensor::quantize(&stored.dequantize(&Device::Cpu)?, dtype)?
        } else {
            stored
        };
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensor_refs)?;
    out.set_position(0);
    let content = gguf_file::Content::read(&mut out)?;
    Ok((content, out))
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
    let wanted = req.schema.as_ref().and_then(super::prompt::questions_asked);
    for i in 0..req.max_tokens as usize {
        if loaded.stop.contains(&next) {
            hit_limit = false;
            break;
        }
        out.push(next);
        if wanted.is_some_and(|n| holds_questions(&loaded.tokenizer, &out, n)) {
            hit_limit = false;
            break;
        }
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
    /// One model behind one lock: a second request waits for the first.
    fn parallelism(&self) -> Option<usize> {
        Some(1)
    }

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
            // Every decoded token allocates fresh tensors; without the guard the kernel zeroed
            // the pages mimalloc had returned, 9% of decoding time (perf).
            let _reuse = crate::alloc::ReuseFreedMemory::hold();
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
            let backend = BuiltinBackend::load_with(
                &path,
                BuiltinOptions {
                    weights: WeightFormat::AsStored,
                },
            )
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

    /// The tiny llama model with its matrices stored as Q4_1, as SmolLM2's file stores them.
    fn tiny_q4_1(dir: &Path) -> PathBuf {
        let f32_path = dir.join("tiny.gguf");
        tiny_gguf::write_tiny_gguf(Architecture::Llama, &f32_path, 5).unwrap();
        let mut file = std::fs::File::open(&f32_path).unwrap();
        let ct = gguf_file::Content::read(&mut file).unwrap();
        let matrices = |t: &gguf_file::TensorInfo| t.shape.dims().len() == 2;
        let (_, gguf) = converted(&ct, &mut file, GgmlDType::Q4_1, matrices).unwrap();
        let path = dir.join("tiny-q4_1.gguf");
        std::fs::write(&path, gguf.into_inner()).unwrap();
        path
    }

    #[test]
    fn weights_without_simd_kernels_are_converted_and_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_q4_1(dir.path());
        let mut file = std::fs::File::open(&path).unwrap();
        let ct = gguf_file::Content::read(&mut file).unwrap();
        for (target, name) in [(GgmlDType::F32, "f32"), (GgmlDType::Q8_0, "q8_0")] {
            let (converted, _) =
                converted(&ct, &mut file, target, |t| lacks_simd(t.ggml_dtype)).unwrap();
            for (tensor, info) in &converted.tensor_infos {
                let was = ct.tensor_infos[tensor].ggml_dtype;
                let expected = if was == GgmlDType::Q4_1 { target } else { was };
                assert_eq!(info.ggml_dtype, expected, "{name}: {tensor}");
            }
        }
        let tokens: Vec<u32> = (3..40).collect();
        let logits = |weights| {
            let backend = BuiltinBackend::load_with(&path, BuiltinOptions { weights }).unwrap();
            let mut loaded = backend.loaded.lock().unwrap();
            let out = loaded.model.forward(&tokens, 0).unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        // Not as stored: candle's scalar Q4_1 product asserts (in debug builds) an even number
        // of 32-weight blocks per row, which this tiny model's 32-wide rows are not (SmolLM2's
        // 576 are), and a panic inside candle's thread pool poisons it for every later test.
        let exact = logits(WeightFormat::F32);
        let spread = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 0.1, "logits too flat to compare: {spread}");
        let q8 = logits(WeightFormat::Q8);
        let diff = exact
            .iter()
            .zip(&q8)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // f32 holds the Q4_1 weights exactly; Q8_0 rounds them (and the activations) to 8 bits.
        assert!(diff > 0.0, "the two formats ran the same code");
        assert!(
            diff < 0.05 * spread,
            "Q8_0 logits differ by {diff} of {spread}"
        );
    }

    #[test]
    fn decoding_stops_once_the_answer_holds_the_questions_asked_for() {
        use crate::data::llm::prompt::{questions_asked, questions_schema};
        assert_eq!(questions_asked(&questions_schema(3)), Some(3));
        assert_eq!(
            questions_asked(&serde_json::json!({"type": "object"})),
            None
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        tiny_gguf::write_tiny_gguf(Architecture::Llama, &path, 5).unwrap();
        let tokenizer = tokenizer_from_gguf_file(&path).unwrap();
        let answer = "1. What is a package? 2. How do I remove one?\n3. Why";
        let ids = tokenizer.encode(answer, false).unwrap().get_ids().to_vec();
        let ends: Vec<usize> = (1..=ids.len())
            .filter(|&n| holds_questions(&tokenizer, &ids[..n], 2))
            .collect();
        let first = ends[0];
        let text = tokenizer.decode(&ids[..first], true).unwrap();
        assert!(text.ends_with("remove one?"), "stopped after {text:?}");
        // One question is not enough for two; the answer's third never ends.
        assert!(!holds_questions(&tokenizer, &ids[..first - 1], 2));
        assert!(holds_questions(&tokenizer, &ids[..first], 1));
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
