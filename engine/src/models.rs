//! Getting models onto a machine: a small catalogue of models known to work (GGUF instruct models
//! for the built-in generator, sentence-embedding bases), pulled from the Hugging Face hub into
//! its standard cache (`HF_HOME`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` honoured), with every file
//! checked after download: the SHA-256 that is its LFS etag, and a GGUF's magic. A file that fails a check is deleted, never left for a later run to load.
use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;
use sha2::{Digest, Sha256};

/// What a catalogue model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRole {
    /// An instruct GGUF for `generate-data --llm builtin --gguf NAME`.
    Generator,
    /// A sentence-transformers model for `--base-model`.
    Embedder,
}

/// One model the project knows how to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Short name to pull and to pass as `--gguf` / `--base-model`.
    pub name: &'static str,
    /// Hugging Face repository.
    pub repo: &'static str,
    /// The file to fetch (a GGUF); `None` for a model directory.
    pub file: Option<&'static str>,
    /// What it is for.
    pub role: ModelRole,
    /// Licence, as the model card states it.
    pub licence: &'static str,
    /// Approximate download size.
    pub size: &'static str,
    /// One line on when to choose it.
    pub about: &'static str,
}

/// Models known to work with this build.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2-135m",
        repo: "bartowski/SmolLM2-135M-Instruct-GGUF",
        file: Some("SmolLM2-135M-Instruct-Q4_K_M.gguf"),
        role: ModelRole::Generator,
        licence: "Apache-2.0",
        size: "105 MB",
        about: "the default: runs anywhere, noisy questions (filtering matters)",
    },
    CatalogEntry {
        name: "qwen2.5-0.5b",
        repo: "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        file: Some("qwen2.5-0.5b-instruct-q4_k_m.gguf"),
        role: ModelRole::Generator,
        licence: "Apache-2.0",
        size: "400 MB",
        about: "much better questions for 4x the time of SmolLM2",
    },
    CatalogEntry {
        name: "qwen3-0.6b",
        repo: "Qwen/Qwen3-0.6B-GGUF",
        file: Some("Qwen3-0.6B-Q8_0.gguf"),
        role: ModelRole::Generator,
        licence: "Apache-2.0",
        size: "640 MB",
        about: "Qwen3, run with thinking off",
    },
    CatalogEntry {
        name: "gemma3-1b",
        repo: "ggml-org/gemma-3-1b-it-GGUF",
        file: Some("gemma-3-1b-it-Q4_K_M.gguf"),
        role: ModelRole::Generator,
        licence: "Gemma Terms of Use",
        size: "810 MB",
        about: "good multilingual questions; read its terms first",
    },
    CatalogEntry {
        name: "phi3.5-mini",
        repo: "bartowski/Phi-3.5-mini-instruct-GGUF",
        file: Some("Phi-3.5-mini-instruct-Q4_K_M.gguf"),
        role: ModelRole::Generator,
        licence: "MIT",
        size: "2.4 GB",
        about: "the best questions here, for machines with 8 GB to spare",
    },
    CatalogEntry {
        name: "all-minilm-l6-v2",
        repo: "sentence-transformers/all-MiniLM-L6-v2",
        file: None,
        role: ModelRole::Embedder,
        licence: "Apache-2.0",
        size: "90 MB",
        about: "the default embedder to fine-tune",
    },
];

/// Errors from resolving or pulling a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// The name is neither a catalogue entry, nor `REPO:FILE`, nor `OWNER/REPO`.
    #[error("unknown model {spec:?}: use a catalogue name ({names}), OWNER/REPO:FILE.gguf for any GGUF on the hub, or OWNER/REPO for a sentence-transformers model")]
    UnknownSpec {
        /// What was given.
        spec: String,
        /// The catalogue's names.
        names: String,
    },
    /// The model is not in the local cache and may not be downloaded.
    #[error("{what} is not in the Hugging Face cache at {cache}: run `ragd-worker models pull {spec}` on a machine that can reach the hub{offline}")]
    NotCached {
        /// What was asked for.
        spec: String,
        /// Repository and file.
        what: String,
        /// The cache searched.
        cache: PathBuf,
        /// A note when HF_HUB_OFFLINE is set.
        offline: &'static str,
    },
    /// Downloading failed.
    #[error("downloading {file} from {repo} failed: {message}")]
    Download {
        /// Repository.
        repo: String,
        /// File.
        file: String,
        /// The hub client's message.
        message: String,
    },
    /// A downloaded file failed a check; it has been deleted.
    #[error("{file} from {repo} is corrupt ({problem}); the file was deleted: pull it again")]
    Corrupt {
        /// Repository.
        repo: String,
        /// File.
        file: String,
        /// What did not match.
        problem: String,
    },
    /// Reading a downloaded file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Resolving an embedder failed.
    #[error(transparent)]
    Hub(#[from] crate::embed::hub::HubError),
}

/// What to pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullSpec {
    /// One GGUF file of a repository.
    Gguf {
        /// Repository.
        repo: String,
        /// File in it.
        file: String,
    },
    /// A sentence-transformers model directory.
    Embedder {
        /// Repository.
        repo: String,
    },
}

/// The catalogue entry called `name`.
pub fn catalog_entry(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name.eq_ignore_ascii_case(name))
}

fn catalog_names() -> String {
    CATALOG
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl PullSpec {
    /// Parses a catalogue name, `OWNER/REPO:FILE` or `OWNER/REPO`.
    pub fn parse(spec: &str) -> Result<Self, ModelsError> {
        if let Some(e) = catalog_entry(spec) {
            return Ok(match e.file {
                Some(file) => Self::Gguf {
                    repo: e.repo.into(),
                    file: file.into(),
                },
                None => Self::Embedder {
                    repo: e.repo.into(),
                },
            });
        }
        let valid_repo = |r: &str| {
            let parts: Vec<&str> = r.split('/').collect();
            parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.contains(' '))
        };
        let unknown = || ModelsError::UnknownSpec {
            spec: spec.into(),
            names: catalog_names(),
        };
        match spec.split_once(':') {
            Some((repo, file)) if valid_repo(repo) && !file.is_empty() && !file.contains("..") => {
                Ok(Self::Gguf {
                    repo: repo.into(),
                    file: file.into(),
                })
            }
            Some(_) => Err(unknown()),
            None if valid_repo(spec) => Ok(Self::Embedder { repo: spec.into() }),
            None => Err(unknown()),
        }
    }
}

/// Where the hub is and whether it may be reached.
#[derive(Debug, Clone)]
pub struct HubAccess {
    /// The local cache.
    pub cache: Cache,
    /// The hub's address (`HF_ENDPOINT`, default https://huggingface.co).
    pub endpoint: Option<String>,
    /// Never download (`HF_HUB_OFFLINE`).
    pub offline: bool,
}

impl HubAccess {
    /// From the environment: `HF_HOME`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        Self {
            cache: Cache::from_env(),
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
            offline: crate::embed::hub::offline_from_env(),
        }
    }
}

/// The local path of a GGUF `--gguf` argument: an existing file as is; otherwise a catalogue
/// name or `REPO:FILE` found in the cache (never downloaded here: `models pull` does that).
pub fn resolve_gguf(arg: &str, hub: &HubAccess) -> Result<PathBuf, ModelsError> {
    let path = Path::new(arg);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    match PullSpec::parse(arg) {
        Ok(PullSpec::Gguf { repo, file }) => {
            hub.cache
                .model(repo.clone())
                .get(&file)
                .ok_or_else(|| ModelsError::NotCached {
                    spec: arg.into(),
                    what: format!("{repo}:{file}"),
                    cache: hub.cache.path().clone(),
                    offline: "",
                })
        }
        // Not a model spec: report the path as missing, with how to get the default.
        _ => Err(ModelsError::NotCached {
            spec: "smollm2-135m".into(),
            what: format!("{arg} (not a file)"),
            cache: hub.cache.path().clone(),
            offline: "",
        }),
    }
}

/// Pulls a model into the cache (or finds it there) and returns its local path: the GGUF file,
/// or the model directory. Blocking (network and disk).
pub fn pull(spec: &PullSpec, hub: &HubAccess) -> Result<PathBuf, ModelsError> {
    match spec {
        PullSpec::Embedder { repo } => Ok(crate::embed::hub::resolve_model_with(
            repo,
            &hub.cache,
            hub.offline,
        )?),
        PullSpec::Gguf { repo, file } => {
            if let Some(path) = hub.cache.model(repo.clone()).get(file) {
                check_gguf_magic(repo, file, &path)?;
                return Ok(path);
            }
            if hub.offline {
                return Err(ModelsError::NotCached {
                    spec: format!("{repo}:{file}"),
                    what: format!("{repo}:{file}"),
                    cache: hub.cache.path().clone(),
                    offline: " (HF_HUB_OFFLINE is set here)",
                });
            }
            let mut builder = ApiBuilder::from_cache(hub.cache.clone()).with_progress(true);
            if let Some(endpoint) = &hub.endpoint {
                builder = builder.with_endpoint(endpoint.clone());
            }
            let download = |e: &dyn std::fmt::Display| ModelsError::Download {
                repo: repo.clone(),
                file: file.clone(),
                message: e.to_string(),
            };
            let api = builder.build().map_err(|e| download(&e))?;
            let path = api
                .model(repo.clone())
                .get(file)
                .map_err(|e| download(&e))?;
            verify_download(repo, file, &path)?;
            tracing::info!(repo = %repo, file = %file, path = %path.display(), "model pulled");
            Ok(path)
        }
    }
}

/// Checks a downloaded file against what the hub announced: the cache names each blob by its
/// etag, which for LFS files (every GGUF) is the content's SHA-256. Deletes it on a mismatch.
fn verify_download(repo: &str, file: &str, path: &Path) -> Result<(), ModelsError> {
    let blob = std::fs::canonicalize(path).map_err(|source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |problem: String| {
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(path);
        ModelsError::Corrupt {
            repo: repo.into(),
            file: file.into(),
            problem,
        }
    };
    let etag = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        let digest = sha256_file(&blob).map_err(|source| ModelsError::Io {
            path: blob.clone(),
            source,
        })?;
        if !digest.eq_ignore_ascii_case(&etag) {
            return Err(corrupt(format!(
                "SHA-256 {digest}, the hub announced {etag}"
            )));
        }
    } else {
        tracing::warn!(repo, file, etag = %etag, "not an LFS file: its content hash cannot be checked");
    }
    let is_gguf = has_gguf_magic(&blob).map_err(|source| ModelsError::Io {
        path: blob.clone(),
        source,
    })?;
    if file.ends_with(".gguf") && !is_gguf {
        return Err(corrupt(NOT_GGUF.into()));
    }
    Ok(())
}

const NOT_GGUF: &str = "not a GGUF file (no GGUF magic)";

/// Whether a file starts with the GGUF magic (a file shorter than it does not).
fn has_gguf_magic(path: &Path) -> std::io::Result<bool> {
    let mut magic = Vec::with_capacity(4);
    std::fs::File::open(path)?.take(4).read_to_end(&mut magic)?;
    Ok(magic == b"GGUF")
}

fn check_gguf_magic(repo: &str, file: &str, path: &Path) -> Result<(), ModelsError> {
    let ok = has_gguf_magic(path).map_err(|source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !ok {
        return Err(ModelsError::Corrupt {
            repo: repo.into(),
            file: file.into(),
            problem: NOT_GGUF.into(),
        });
    }
    Ok(())
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_from_names_repo_files_and_repos() {
        assert_eq!(
            PullSpec::parse("Qwen2.5-0.5B").unwrap(),
            PullSpec::Gguf {
                repo: "Qwen/Qwen2.5-0.5B-Instruct-GGUF".into(),
                file: "qwen2.5-0.5b-instruct-q4_k_m.gguf".into()
            }
        );
        assert_eq!(
            PullSpec::parse("acme/m-GGUF:m-Q8_0.gguf").unwrap(),
            PullSpec::Gguf {
                repo: "acme/m-GGUF".into(),
                file: "m-Q8_0.gguf".into()
            }
        );
        assert_eq!(
            PullSpec::parse("acme/embedder").unwrap(),
            PullSpec::Embedder {
                repo: "acme/embedder".into()
            }
        );
        for bad in ["nonsense", "a/b/c", "acme/x:../../etc/passwd", "acme/x:"] {
            let e = PullSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("smollm2-135m"), "{bad}: {e}");
        }
        // Every catalogue name parses to its own entry.
        for e in CATALOG {
            assert!(PullSpec::parse(e.name).is_ok(), "{}", e.name);
        }
    }

    #[test]
    fn resolve_gguf_prefers_files_then_the_cache_and_says_how_to_pull() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubAccess {
            cache: Cache::new(dir.path().join("cache")),
            endpoint: None,
            offline: true,
        };
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        assert_eq!(resolve_gguf(file.to_str().unwrap(), &hub).unwrap(), file);
        let e = resolve_gguf("qwen3-0.6b", &hub).unwrap_err().to_string();
        assert!(e.contains("ragd-worker models pull qwen3-0.6b"), "{e}");
        let e = resolve_gguf("/no/such.gguf", &hub).unwrap_err().to_string();
        assert!(e.contains("/no/such.gguf (not a file)"), "{e}");
    }

    #[test]
    fn offline_pull_of_an_absent_model_names_the_switch() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubAccess {
            cache: Cache::new(dir.path().to_path_buf()),
            endpoint: None,
            offline: true,
        };
        let e = pull(&PullSpec::parse("smollm2-135m").unwrap(), &hub)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    }

    #[test]
    fn sha256_of_a_known_string() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
