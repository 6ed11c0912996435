//! The prompt that asks an LLM for questions about a passage, and the JSON schema of its answer.

use serde::{Deserialize, Serialize};
use serde_json::json;

/// A prompt template that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prompt template invalid: {reason}")]
pub struct InvalidPrompt {
    /// What is wrong.
    pub reason: String,
}

/// A prompt: a system message and a user template with `{n}` and `{passage}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTemplate {
    /// The system message.
    pub system: String,
    /// The user message; `{passage}` is required, `{n}` optional.
    pub user: String,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        Self {
            system: "You write realistic search questions for a documentation search engine.".into(),
            user: "Passage:\n---\n{passage}\n---\n\nWrite {n} diverse questions that a user of this documentation might ask and that this passage answers. Each question must make sense on its own (never say \"the passage\" or \"the text\"), be answerable from the passage, and use different wording from it. Answer in JSON: {\"questions\": [\"...\"]}.".into(),
        }
    }
}

impl PromptTemplate {
    /// Checks the placeholders.
    pub fn validate(&self) -> Result<(), InvalidPrompt> {
        if !self.user.contains("{passage}") {
            return Err(InvalidPrompt {
                reason: "the user template must contain {passage}".into(),
            });
        }
        Ok(())
    }

    /// The user message for a passage.
    pub fn render(&self, n: usize, passage: &str) -> String {
        self.user
            .replace("{n}", &n.to_string())
            .replace("{passage}", passage)
    }

    /// A short stable hash of the prompt, for the manifest.
    pub fn hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(self.system.as_bytes());
        h.update(&[0]);
        h.update(self.user.as_bytes());
        h.finalize().to_hex()[..16].to_string()
    }
}

/// The JSON schema of an answer with up to `n` questions.
pub fn questions_schema(n: usize) -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "questions": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": n.max(1),
            }
        },
        "required": ["questions"],
    })
}

/// The number of questions an answer following `schema` holds at most (the `maxItems` of
/// [`questions_schema`]), if the schema asks for questions.
pub fn questions_asked(schema: &serde_json::Value) -> Option<usize> {
    let n = schema.pointer("/properties/questions/maxItems")?.as_u64()?;
    usize::try_from(n).ok().filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_validate_and_hash() {
        let t = PromptTemplate::default();
        assert_eq!(t.hash(), PromptTemplate::default().hash());
        assert_eq!(t.hash().len(), 16);
        let bad = PromptTemplate {
            system: String::new(),
            user: "no placeholder".into(),
        };
        assert!(bad.validate().is_err());
    }
}
