//! Chat prompt formats of the instruct models the built-in generator runs. The format is
//! recognised from the GGUF's `tokenizer.chat_template` (the way llama.cpp detects templates: by
//! their markers, not by running Jinja), or, without one, from the control tokens the vocabulary
//! has. There is no constrained decoding and the JSON schema is not spelled out either (small
//! models echo it back instead of answering): the prompt itself describes the answer's format.
use tokenizers::Tokenizer;

use crate::data::llm::ChatRequest;

/// A chat prompt format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\n...<|im_end|>` (SmolLM2, Qwen2/2.5/3). `no_think` opens the answer with
    /// an empty `<think></think>` block, as Qwen3's template does with thinking off.
    ChatMl {
        /// Answer without a reasoning block (Qwen3).
        no_think: bool,
    },
    /// `<start_of_turn>user\n...<end_of_turn>` (Gemma; the system text leads the first turn).
    Gemma,
    /// `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>` (Llama 3).
    Llama3,
    /// `<|system|>\n...<|end|>\n<|user|>\n...` (Phi-3).
    Phi3,
}

impl ChatFormat {
    /// The format a model's chat template (or, lacking one, its vocabulary) shows.
    pub fn detect(template: Option<&str>, tokenizer: &Tokenizer) -> Option<Self> {
        let has = |piece: &str| tokenizer.token_to_id(piece).is_some();
        match template {
            Some(t) if t.contains("<|im_start|>") => Some(Self::ChatMl {
                no_think: t.contains("enable_thinking"),
            }),
            Some(t) if t.contains("<start_of_turn>") => Some(Self::Gemma),
            Some(t) if t.contains("<|start_header_id|>") => Some(Self::Llama3),
            Some(t) if t.contains("<|user|>") && t.contains("<|end|>") => Some(Self::Phi3),
            Some(_) => None,
            None if has("<|im_start|>") && has("<|im_end|>") => {
                Some(Self::ChatMl { no_think: false })
            }
            None if has("<start_of_turn>") && has("<end_of_turn>") => Some(Self::Gemma),
            None if has("<|start_header_id|>") && has("<|eot_id|>") => Some(Self::Llama3),
            None if has("<|user|>") && has("<|end|>") => Some(Self::Phi3),
            None => None,
        }
    }

    /// The prompt for a request, up to where the assistant's answer starts (without BOS).
    pub fn render(self, req: &ChatRequest) -> String {
        let user = &req.user;
        let system = req.system.as_deref().filter(|s| !s.trim().is_empty());
        match self {
            Self::ChatMl { no_think } => {
                let mut s = String::new();
                if let Some(system) = system {
                    s.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
                }
                s.push_str(&format!(
                    "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
                ));
                if no_think {
                    s.push_str("<think>\n\n</think>\n\n");
                }
                s
            }
            Self::Gemma => {
                let first = match system {
                    Some(system) => format!("{system}\n\n{user}"),
                    None => user.clone(),
                };
                format!("<start_of_turn>user\n{first}<end_of_turn>\n<start_of_turn>model\n")
            }
            Self::Llama3 => {
                let mut s = String::new();
                if let Some(system) = system {
                    s.push_str(&format!(
                        "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
                    ));
                }
                s.push_str(&format!(
                    "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                ));
                s
            }
            Self::Phi3 => {
                let mut s = String::new();
                if let Some(system) = system {
                    s.push_str(&format!("<|system|>\n{system}<|end|>\n"));
                }
                s.push_str(&format!("<|user|>\n{user}<|end|>\n<|assistant|>\n"));
                s
            }
        }
    }

    /// The pieces that end the assistant's turn (the file's EOS token is added by the caller).
    pub fn stop_pieces(self) -> &'static [&'static str] {
        match self {
            Self::ChatMl { .. } => &["<|im_end|>", "<|endoftext|>"],
            Self::Gemma => &["<end_of_turn>", "<eos>"],
            Self::Llama3 => &["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"],
            Self::Phi3 => &["<|end|>", "<|endoftext|>"],
        }
    }

    /// The pieces this format's prompt needs in the vocabulary.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            Self::ChatMl { .. } => &["<|im_start|>", "<|im_end|>"],
            Self::Gemma => &["<start_of_turn>", "<end_of_turn>"],
            Self::Llama3 => &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            Self::Phi3 => &["<|user|>", "<|end|>", "<|assistant|>"],
        }
    }
}

/// The answer without a reasoning block some models write first (`<think>...</think>`).
pub fn strip_reasoning(text: &str) -> &str {
    match text.rfind("</think>") {
        Some(end) => text[end + "</think>".len()..].trim_start(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::AddedToken;

    fn request(system: Option<&str>) -> ChatRequest {
        ChatRequest {
            system: system.map(str::to_string),
            user: "question please".into(),
            schema: Some(serde_json::json!({"type": "object"})),
            temperature: 0.0,
            seed: None,
            max_tokens: 4,
        }
    }

    fn vocab(pieces: &[&str]) -> Tokenizer {
        let mut t = Tokenizer::new(
            WordLevel::builder()
                .vocab([("[UNK]".to_string(), 0)].into_iter().collect())
                .unk_token("[UNK]".into())
                .build()
                .unwrap(),
        );
        t.add_special_tokens(
            &pieces
                .iter()
                .map(|p| AddedToken::from(p.to_string(), true))
                .collect::<Vec<_>>(),
        );
        t
    }

    #[test]
    fn chatml_prompt_has_roles_and_no_schema() {
        let p = ChatFormat::ChatMl { no_think: false }.render(&request(Some("sys")));
        assert_eq!(
            p,
            "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nquestion please<|im_end|>\n<|im_start|>assistant\n"
        );
        let q = ChatFormat::ChatMl { no_think: true }.render(&request(None));
        assert!(q.starts_with("<|im_start|>user\n"));
        assert!(q.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    }

    #[test]
    fn other_formats_render_their_turns() {
        assert_eq!(
            ChatFormat::Gemma.render(&request(Some("sys"))),
            "<start_of_turn>user\nsys\n\nquestion please<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            ChatFormat::Phi3.render(&request(Some("sys"))),
            "<|system|>\nsys<|end|>\n<|user|>\nquestion please<|end|>\n<|assistant|>\n"
        );
        assert_eq!(
            ChatFormat::Llama3.render(&request(None)),
            "<|start_header_id|>user<|end_header_id|>\n\nquestion please<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn detection_from_template_then_vocabulary() {
        let none = vocab(&[]);
        let qwen3 = "{%- if enable_thinking is defined %}<|im_start|>assistant{% endif %}";
        assert_eq!(
            ChatFormat::detect(Some(qwen3), &none),
            Some(ChatFormat::ChatMl { no_think: true })
        );
        assert_eq!(
            ChatFormat::detect(Some("{{ '<start_of_turn>' + role }}"), &none),
            Some(ChatFormat::Gemma)
        );
        assert_eq!(
            ChatFormat::detect(Some("{{ '<|user|>' + m + '<|end|>' }}"), &none),
            Some(ChatFormat::Phi3)
        );
        assert_eq!(
            ChatFormat::detect(Some("[INST] {{ m }} [/INST]"), &none),
            None
        );
        assert_eq!(
            ChatFormat::detect(None, &vocab(&["<|im_start|>", "<|im_end|>"])),
            Some(ChatFormat::ChatMl { no_think: false })
        );
        assert_eq!(
            ChatFormat::detect(None, &vocab(&["<|start_header_id|>", "<|eot_id|>"])),
            Some(ChatFormat::Llama3)
        );
        assert_eq!(ChatFormat::detect(None, &none), None);
    }

    #[test]
    fn reasoning_is_stripped() {
        assert_eq!(
            strip_reasoning("<think>hmm</think>\n{\"questions\":[]}"),
            "{\"questions\":[]}"
        );
        assert_eq!(strip_reasoning("plain"), "plain");
    }
}
