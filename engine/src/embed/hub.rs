//! Resolving a model argument to a local directory: a directory as is, or a Hugging Face hub id
//! looked up in the local hub cache first and downloaded only when absent (never when offline).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

/// Files a model needs; the snapshot directory is resolved from the first.
const REQUIRED: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];
/// Files fetched when present (sentence-transformers pipeline and tokenizer extras).
const OPTIONAL: [&str; 7] = [
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "config_sentence_transformers.json",
];

/// Errors raised while resolving a model argument.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Neither a local directory nor available from the hub cache or network.
    #[error(
        "model {spec:?} is not a local directory and {file} is not in the Hugging Face cache at \
         {cache}{reason}. Pass a local model directory, or download it where the hub is reachable \
         (`huggingface-cli download {spec}`) and copy the cache, or unset HF_HUB_OFFLINE"
    )]
    Unavailable {
        /// The argument given.
        spec: String,
        /// The first file that could not be found.
        file: String,
        /// The cache directory searched.
        cache: PathBuf,
        /// Why downloading did not help (empty when offline).
        reason: String,
    },
}

/// Whether `HF_HUB_OFFLINE` asks for no network access.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "YES" | "on"))
        .unwrap_or(false)
}

/// Resolves `spec` with the cache from the environment (`HF_HOME`) and `HF_HUB_OFFLINE`.
pub fn resolve_model(spec: &str) -> Result<PathBuf, HubError> {
    resolve_model_with(spec, &Cache::from_env(), offline_from_env())
}

/// Resolves `spec`: an existing directory is returned as is; otherwise `spec` is a hub id whose
/// files are taken from `cache`, downloading missing ones unless `offline`.
pub fn resolve_model_with(spec: &str, cache: &Cache, offline: bool) -> Result<PathBuf, HubError> {
    let as_path = Path::new(spec);
    if as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    let cached = cache.model(spec.to_string());
    let mut snapshot: Option<PathBuf> = None;
    let api = if offline {
        None
    } else {
        ApiBuilder::from_cache(cache.clone())
            .with_progress(false)
            .build()
            .ok()
    };
    for file in REQUIRED.iter().chain(OPTIONAL.iter()) {
        let required = REQUIRED.contains(file);
        let found = match cached.get(file) {
            Some(p) => Some(p),
            None => match &api {
                Some(api) => match api.model(spec.to_string()).get(file) {
                    Ok(p) => Some(p),
                    Err(e) if required => {
                        return Err(HubError::Unavailable {
                            spec: spec.into(),
                            file: file.to_string(),
                            cache: cache.path().clone(),
                            reason: format!(", and downloading it failed: {e}"),
                        })
                    }
                    Err(_) => None,
                },
                None => None,
            },
        };
        match found {
            Some(p) if snapshot.is_none() => {
                snapshot = p.parent().map(Path::to_path_buf);
            }
            Some(_) => {}
            None if required => {
                return Err(HubError::Unavailable {
                    spec: spec.into(),
                    file: file.to_string(),
                    cache: cache.path().clone(),
                    reason: if offline {
                        " (HF_HUB_OFFLINE is set, so nothing was downloaded)".into()
                    } else {
                        String::new()
                    },
                })
            }
            None => {}
        }
    }
    let dir = snapshot.unwrap_or_default();
    tracing::info!(spec, dir = %dir.display(), "resolved hub model");
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_directory_is_used_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().to_str().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        assert_eq!(resolve_model_with(spec, &cache, true).unwrap(), dir.path());
    }

    #[test]
    fn hub_id_resolves_from_cache_offline() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path().to_path_buf());
        let repo = root.path().join("models--acme--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(snap.join("1_Pooling")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        for f in [
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "1_Pooling/config.json",
        ] {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
        assert_eq!(resolve_model_with("acme/tiny", &cache, true).unwrap(), snap);
    }

    #[test]
    fn absent_model_offline_says_how_to_get_it() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path().to_path_buf());
        let err = resolve_model_with("acme/absent", &cache, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("huggingface-cli download"),
            "{err}"
        );
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    }
}
