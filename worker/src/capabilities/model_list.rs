//! The model lists LLM servers answer with: Ollama's `GET /api/tags` and an OpenAI-compatible
//! `GET /v1/models`, read into model names.

use ragd_shared::protocol::capabilities::LlmApi;
use serde::Deserialize;

/// Ollama's `GET /api/tags` answer (other fields ignored).
#[derive(Deserialize)]
struct OllamaTags {
    /// Required; `null` (a nil Go slice) reads as no models.
    #[serde(deserialize_with = "null_as_empty")]
    models: Vec<OllamaModel>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
struct OllamaModel {
    name: String,
}

/// An OpenAI-compatible `GET /v1/models` answer (other fields ignored).
#[derive(Deserialize)]
struct OpenAiModels {
    data: Vec<OpenAiModel>,
}

#[derive(Deserialize)]
struct OpenAiModel {
    id: String,
}

/// Model names from a model-list answer, in the order listed.
pub(super) fn parse_models(api: LlmApi, body: &[u8]) -> Result<Vec<String>, String> {
    let what = |e: serde_json::Error| format!("not a model list: {e}");
    match api {
        LlmApi::Ollama => {
            let tags: OllamaTags = serde_json::from_slice(body).map_err(what)?;
            Ok(tags.models.into_iter().map(|m| m.name).collect())
        }
        LlmApi::OpenAiCompatible => {
            let list: OpenAiModels = serde_json::from_slice(body).map_err(what)?;
            Ok(list.data.into_iter().map(|m| m.id).collect())
        }
    }
}
