//! Detection of what this machine can do: OS, CPU, memory, GPUs and local LLM endpoints.
//!
//! [`detect`] gathers everything into the wire type [`Capabilities`], with the operator's
//! [`CapabilityOverrides`] applied; [`sample_load`] gives the per-heartbeat [`Load`];
//! [`render_text`] formats a report for `ragd-worker info`.

mod gpu;
mod llm;
mod model_list;
mod render;
mod system;
#[cfg(test)]
mod test_http;

use serde::{Deserialize, Serialize};

pub use llm::{probe_llm_endpoints, LlmProbeConfig, OpenAiEndpointConfig, DEFAULT_OLLAMA_URL};
pub use ragd_shared::protocol::capabilities::{
    Backend, Capabilities, GpuInfo, LlmApi, LlmEndpoint, Load,
};
pub use render::render_text;
pub use system::{parse_size, sample_load};

/// Everything that can go wrong while detecting capabilities.
///
/// Only configuration mistakes are errors: a missing GPU driver or an unreachable LLM endpoint
/// is reported as "not there" (with a log event), never as an error.
#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    /// A human-readable size in the configuration could not be parsed.
    #[error(
        "invalid size for `{key}`: {value:?} ({reason}); write a whole or decimal number followed by \
         B, KB, MB, GB, TB, KiB, MiB, GiB or TiB, e.g. \"8GiB\""
    )]
    InvalidSize {
        /// Configuration key holding the size.
        key: &'static str,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting has a value that makes no sense, such as zero cores or a zero probe timeout.
    #[error("invalid value for `{key}`: {value} ({reason})")]
    InvalidSetting {
        /// Configuration key.
        key: &'static str,
        /// The value as configured.
        value: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
    /// An LLM endpoint URL in the configuration is unusable.
    #[error("invalid URL for LLM endpoint `{endpoint}`: {url:?} ({reason})")]
    InvalidEndpointUrl {
        /// Endpoint name ("ollama" for the Ollama endpoint).
        endpoint: String,
        /// The URL as configured.
        url: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
    /// The HTTP client used to probe LLM endpoints could not be built.
    #[error("cannot build the HTTP client for LLM probing: {source}; this is a bug or a broken TLS/system setup")]
    HttpClient {
        /// The underlying reqwest error.
        #[source]
        source: reqwest::Error,
    },
    /// A blocking detection task died (it panicked or the runtime is shutting down).
    #[error(
        "{what} detection task failed: {source}; rerun with RUST_BACKTRACE=1 and report the output"
    )]
    TaskFailed {
        /// Which detection ("system" for OS/CPU/memory).
        what: &'static str,
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Operator limits on what the worker advertises: the `[capabilities]` section of the worker config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapabilityOverrides {
    /// Advertise no GPU at all (CPU-only operation).
    pub force_cpu: bool,
    /// GPU ordinals (within their backend) to hide from the cluster.
    pub hide_gpus: Vec<u32>,
    /// Cap on the logical cores advertised.
    pub max_cores: Option<u32>,
    /// Cap on the memory advertised, as a human size such as "8GiB" or "16GB".
    pub max_memory: Option<String>,
    /// Work slots offered to the coordinator (default 1).
    pub slots: Option<u32>,
}

impl CapabilityOverrides {
    /// Work slots offered when `slots` is not set.
    pub const DEFAULT_SLOTS: u32 = 1;

    /// Checks every field, so a bad config fails at startup with a message naming the key.
    pub fn validate(&self) -> Result<(), CapabilityError> {
        self.max_memory_bytes()?;
        self.slots()?;
        if self.max_cores == Some(0) {
            return Err(CapabilityError::InvalidSetting {
                key: "max_cores",
                value: "0".into(),
                reason: "at least one core is needed; remove the key to use every core".into(),
            });
        }
        Ok(())
    }

    /// `max_memory` parsed to bytes, if set.
    pub fn max_memory_bytes(&self) -> Result<Option<u64>, CapabilityError> {
        let Some(text) = &self.max_memory else {
            return Ok(None);
        };
        let bytes = parse_size("max_memory", text)?;
        if bytes == 0 {
            return Err(CapabilityError::InvalidSize {
                key: "max_memory",
                value: text.clone(),
                reason: "a zero memory cap leaves nothing to work with; remove the key for no cap"
                    .into(),
            });
        }
        Ok(Some(bytes))
    }

    /// Work slots offered (the configured value or [`Self::DEFAULT_SLOTS`]).
    pub fn slots(&self) -> Result<u32, CapabilityError> {
        match self.slots {
            Some(0) => Err(CapabilityError::InvalidSetting {
                key: "slots",
                value: "0".into(),
                reason:
                    "a worker must offer at least one slot; remove the key for the default of 1"
                        .into(),
            }),
            Some(n) => Ok(n),
            None => Ok(Self::DEFAULT_SLOTS),
        }
    }

    /// Applies the caps and GPU filters to detected capabilities.
    pub fn apply(&self, mut caps: Capabilities) -> Result<Capabilities, CapabilityError> {
        self.validate()?;
        if let Some(max) = self.max_cores {
            caps.logical_cores = caps.logical_cores.min(max);
        }
        if let Some(max) = self.max_memory_bytes()? {
            caps.total_memory_bytes = caps.total_memory_bytes.min(max);
        }
        caps.available_memory_bytes = caps.available_memory_bytes.min(caps.total_memory_bytes);
        if self.force_cpu {
            caps.gpus.clear();
        } else {
            caps.gpus.retain(|g| !self.hide_gpus.contains(&g.index));
        }
        Ok(caps)
    }
}

/// The backends compiled into this build: CPU always, plus CUDA and Metal per cargo feature.
pub fn compiled_backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Cpu];
    if cfg!(feature = "cuda") {
        backends.push(Backend::Cuda);
    }
    if cfg!(feature = "metal") {
        backends.push(Backend::Metal);
    }
    backends
}

/// Longest wait for the GPU driver (CUDA initialisation can take seconds on multi-GPU machines).
const GPU_DETECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Detects this machine's capabilities, with `overrides` applied.
///
/// System facts and GPUs are read on blocking threads while the LLM endpoints are probed
/// concurrently, each bounded by `llm.timeout`; a GPU driver that does not answer within 30 s
/// counts as no GPU. Errors only for invalid configuration.
pub async fn detect(
    overrides: &CapabilityOverrides,
    llm: &LlmProbeConfig,
) -> Result<Capabilities, CapabilityError> {
    overrides.validate()?;
    let force_cpu = overrides.force_cpu;
    let system_task = tokio::task::spawn_blocking(system::detect_system);
    let gpu_task = tokio::task::spawn_blocking(move || {
        if force_cpu {
            tracing::debug!("force_cpu set: skipping GPU detection");
            Vec::new()
        } else {
            gpu::detect_gpus()
        }
    });
    let llm_result = probe_llm_endpoints(llm).await;
    let system = system_task
        .await
        .map_err(|source| CapabilityError::TaskFailed {
            what: "system",
            source,
        })?;
    let gpus = match tokio::time::timeout(GPU_DETECT_TIMEOUT, gpu_task).await {
        Ok(Ok(gpus)) => gpus,
        Ok(Err(error)) => {
            tracing::warn!(%error, "GPU detection failed; reporting no GPU");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(
                timeout = ?GPU_DETECT_TIMEOUT,
                "GPU driver did not answer in time; reporting no GPU (check `nvidia-smi`)"
            );
            Vec::new()
        }
    };
    let caps = Capabilities {
        os: system.os,
        arch: system.arch,
        hostname: system.hostname,
        cpu_model: system.cpu_model,
        logical_cores: system.logical_cores,
        total_memory_bytes: system.total_memory_bytes,
        available_memory_bytes: system.available_memory_bytes,
        gpus,
        backends: compiled_backends(),
        llm_endpoints: llm_result?,
    };
    overrides.apply(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(backend: Backend, index: u32) -> GpuInfo {
        GpuInfo {
            backend,
            index,
            name: format!("GPU {index}"),
            memory_bytes: 8 << 30,
            compute_capability: Some((8, 6)),
        }
    }

    fn detected() -> Capabilities {
        Capabilities {
            os: "Linux".into(),
            arch: "x86_64".into(),
            hostname: "h".into(),
            cpu_model: "cpu".into(),
            logical_cores: 16,
            total_memory_bytes: 32 << 30,
            available_memory_bytes: 20 << 30,
            gpus: vec![
                gpu(Backend::Cuda, 0),
                gpu(Backend::Cuda, 1),
                gpu(Backend::Cuda, 2),
            ],
            backends: vec![Backend::Cpu, Backend::Cuda],
            llm_endpoints: Vec::new(),
        }
    }

    #[test]
    fn no_overrides_change_nothing() {
        let caps = CapabilityOverrides::default().apply(detected()).unwrap();
        assert_eq!(caps, detected());
        assert_eq!(CapabilityOverrides::default().slots().unwrap(), 1);
    }

    #[test]
    fn caps_cores_and_memory() {
        let o = CapabilityOverrides {
            max_cores: Some(4),
            max_memory: Some("8GiB".into()),
            ..Default::default()
        };
        let caps = o.apply(detected()).unwrap();
        assert_eq!(caps.logical_cores, 4);
        assert_eq!(caps.total_memory_bytes, 8 << 30);
        assert_eq!(caps.available_memory_bytes, 8 << 30);
        assert_eq!(caps.gpus.len(), 3);

        // Caps above what the machine has leave the detected values alone.
        let o = CapabilityOverrides {
            max_cores: Some(64),
            max_memory: Some("1TiB".into()),
            ..Default::default()
        };
        let caps = o.apply(detected()).unwrap();
        assert_eq!(caps.logical_cores, 16);
        assert_eq!(caps.total_memory_bytes, 32 << 30);
        assert_eq!(caps.available_memory_bytes, 20 << 30);
    }

    #[test]
    fn force_cpu_hides_every_gpu_and_hide_gpus_hides_some() {
        let o = CapabilityOverrides {
            force_cpu: true,
            ..Default::default()
        };
        let caps = o.apply(detected()).unwrap();
        assert!(caps.gpus.is_empty());
        assert_eq!(caps.best_backend(), Backend::Cpu);

        let o = CapabilityOverrides {
            hide_gpus: vec![0, 2, 7],
            ..Default::default()
        };
        let caps = o.apply(detected()).unwrap();
        assert_eq!(caps.gpus, vec![gpu(Backend::Cuda, 1)]);
    }

    #[test]
    fn rejects_nonsense_overrides_naming_the_key() {
        let cases = [
            (
                CapabilityOverrides {
                    max_cores: Some(0),
                    ..Default::default()
                },
                "max_cores",
            ),
            (
                CapabilityOverrides {
                    slots: Some(0),
                    ..Default::default()
                },
                "slots",
            ),
            (
                CapabilityOverrides {
                    max_memory: Some("0GiB".into()),
                    ..Default::default()
                },
                "max_memory",
            ),
            (
                CapabilityOverrides {
                    max_memory: Some("lots".into()),
                    ..Default::default()
                },
                "max_memory",
            ),
        ];
        for (o, key) in cases {
            let e = o.apply(detected()).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn overrides_read_from_toml() {
        let o: CapabilityOverrides = toml::from_str(
            "force_cpu = true\nhide_gpus = [1]\nmax_cores = 6\nmax_memory = \"12 GiB\"\nslots = 2\n",
        )
        .unwrap();
        assert_eq!(
            o,
            CapabilityOverrides {
                force_cpu: true,
                hide_gpus: vec![1],
                max_cores: Some(6),
                max_memory: Some("12 GiB".into()),
                slots: Some(2),
            }
        );
        assert_eq!(o.max_memory_bytes().unwrap(), Some(12 << 30));
        assert_eq!(o.slots().unwrap(), 2);
        let empty: CapabilityOverrides = toml::from_str("").unwrap();
        assert_eq!(empty, CapabilityOverrides::default());
        assert!(toml::from_str::<CapabilityOverrides>("max_core = 6").is_err());
    }

    #[test]
    fn backends_follow_the_build() {
        let b = compiled_backends();
        assert_eq!(b[0], Backend::Cpu);
        assert_eq!(b.contains(&Backend::Cuda), cfg!(feature = "cuda"));
        assert_eq!(b.contains(&Backend::Metal), cfg!(feature = "metal"));
    }

    #[tokio::test]
    async fn detects_this_machine() {
        let o = CapabilityOverrides {
            max_cores: Some(1),
            ..Default::default()
        };
        let caps = detect(&o, &LlmProbeConfig::disabled()).await.unwrap();
        assert_eq!(caps.logical_cores, 1);
        assert!(caps.total_memory_bytes > 0);
        assert!(caps.available_memory_bytes <= caps.total_memory_bytes);
        assert!(caps.backends.contains(&Backend::Cpu));
        assert!(caps.llm_endpoints.is_empty());
        assert!(!caps.hostname.is_empty() && !caps.os.is_empty() && !caps.cpu_model.is_empty());

        let forced = CapabilityOverrides {
            force_cpu: true,
            ..Default::default()
        };
        let caps = detect(&forced, &LlmProbeConfig::disabled()).await.unwrap();
        assert!(caps.gpus.is_empty());
        assert!(caps.logical_cores >= 1);
    }

    #[tokio::test]
    async fn detect_rejects_invalid_overrides_before_probing() {
        let o = CapabilityOverrides {
            max_memory: Some("8XB".into()),
            ..Default::default()
        };
        let e = detect(&o, &LlmProbeConfig::disabled()).await.unwrap_err();
        assert!(
            matches!(
                e,
                CapabilityError::InvalidSize {
                    key: "max_memory",
                    ..
                }
            ),
            "{e}"
        );
    }
}
