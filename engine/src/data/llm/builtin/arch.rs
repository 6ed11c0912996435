//! The model families the built-in generator runs, chosen from a GGUF file's
//! `general.architecture`: each is one of candle-transformers' quantized implementations.
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{
    quantized_gemma3, quantized_llama, quantized_phi3, quantized_qwen2, quantized_qwen3,
};

/// The longest context the built-in generator uses, whatever the model allows: prompts are one
/// passage and an instruction, and some caches are allocated at full length up front.
pub const MAX_CONTEXT: usize = 4096;

/// A GGUF architecture the built-in generator can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama and its relatives (SmolLM2, Llama 3, Mistral).
    Llama,
    /// Qwen2 / Qwen2.5.
    Qwen2,
    /// Qwen3 (dense).
    Qwen3,
    /// Gemma 3 (also gemma / gemma2 metadata prefixes).
    Gemma3,
    /// Phi-3 / Phi-3.5.
    Phi3,
}

impl Architecture {
    /// Every supported architecture, for error messages.
    pub const ALL: [Architecture; 5] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma3,
        Architecture::Phi3,
    ];

    /// The architecture a `general.architecture` value names, if supported.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" | "gemma2" | "gemma" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }

    /// The name GGUF files use.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
        }
    }

    /// The prefix of this architecture's hyperparameter keys in the file (gemma files use
    /// `gemma3.`, `gemma2.` or `gemma.`).
    pub fn metadata_prefix(self, ct: &gguf_file::Content) -> String {
        match self {
            Self::Gemma3 => ["gemma3", "gemma2", "gemma"]
                .into_iter()
                .find(|p| {
                    ct.metadata
                        .contains_key(&format!("{p}.attention.head_count"))
                })
                .unwrap_or("gemma3")
                .to_string(),
            other => other.gguf_name().to_string(),
        }
    }

    /// A comma-separated list of the supported names.
    pub fn supported_list() -> String {
        Self::ALL
            .iter()
            .map(|a| a.gguf_name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The loaded weights of one architecture behind one `forward`.
pub enum ArchModel {
    /// quantized_llama.
    Llama(quantized_llama::ModelWeights),
    /// quantized_qwen2.
    Qwen2(quantized_qwen2::ModelWeights),
    /// quantized_qwen3.
    Qwen3(quantized_qwen3::ModelWeights),
    /// quantized_gemma3.
    Gemma3(quantized_gemma3::ModelWeights),
    /// quantized_phi3.
    Phi3(quantized_phi3::ModelWeights),
}

impl ArchModel {
    /// Loads the weights of `arch` from a parsed GGUF file. The file's context length is capped
    /// at [`MAX_CONTEXT`] first (Phi-3 allocates its cache at full length).
    pub fn load<R: std::io::Read + std::io::Seek>(
        arch: Architecture,
        mut ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let key = format!("{}.context_length", arch.metadata_prefix(&ct));
        if let Some(len) = ct.metadata.get(&key).and_then(|v| v.to_u32().ok()) {
            let capped = (len as usize).min(MAX_CONTEXT) as u32;
            ct.metadata.insert(key, gguf_file::Value::U32(capped));
        }
        Ok(match arch {
            Architecture::Llama => Self::Llama(quantized_llama::ModelWeights::from_gguf(
                ct, reader, device,
            )?),
            Architecture::Qwen2 => Self::Qwen2(quantized_qwen2::ModelWeights::from_gguf(
                ct, reader, device,
            )?),
            Architecture::Qwen3 => Self::Qwen3(quantized_qwen3::ModelWeights::from_gguf(
                ct, reader, device,
            )?),
            Architecture::Gemma3 => Self::Gemma3(quantized_gemma3::ModelWeights::from_gguf(
                ct, reader, device,
            )?),
            Architecture::Phi3 => Self::Phi3(quantized_phi3::ModelWeights::from_gguf(
                false, ct, reader, device,
            )?),
        })
    }

    /// Logits `[vocab]` for the last of `tokens`, which sit at positions `position..`. Position
    /// 0 starts a new sequence (every cache is cleared).
    pub fn forward(&mut self, tokens: &[u32], position: usize) -> candle_core::Result<Tensor> {
        let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let logits = match self {
            Self::Llama(m) => m.forward(&input, position)?,
            Self::Qwen2(m) => m.forward(&input, position)?,
            Self::Qwen3(m) => {
                if position == 0 {
                    m.clear_kv_cache();
                }
                m.forward(&input, position)?
            }
            Self::Gemma3(m) => m.forward(&input, position)?,
            Self::Phi3(m) => m.forward(&input, position)?,
        };
        // Every family returns [1, vocab] for the last position; some compute in f16.
        logits.squeeze(0)?.to_dtype(candle_core::DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_gemma_aliases() {
        for a in Architecture::ALL {
            assert_eq!(Architecture::from_gguf_name(a.gguf_name()), Some(a));
        }
        assert_eq!(
            Architecture::from_gguf_name("gemma2"),
            Some(Architecture::Gemma3)
        );
        assert_eq!(Architecture::from_gguf_name("mamba"), None);
        assert_eq!(
            Architecture::supported_list(),
            "llama, qwen2, qwen3, gemma3, phi3"
        );
    }
}
