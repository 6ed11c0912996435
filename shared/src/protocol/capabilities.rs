//! What a worker machine can do, as reported in the handshake and refreshed by heartbeats.
//!
//! Detection lives in the worker crate; these are the wire types.

use serde::{Deserialize, Serialize};

/// Everything the coordinator needs to know to place work on a worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Operating system name and version, e.g. "Debian GNU/Linux 12".
    pub os: String,
    /// CPU architecture, e.g. "x86_64" or "aarch64".
    pub arch: String,
    /// Host name of the machine.
    pub hostname: String,
    /// CPU model name.
    pub cpu_model: String,
    /// Logical cores usable by ragd (after any configured cap).
    pub logical_cores: u32,
    /// Total RAM usable by ragd in bytes (after any configured cap).
    pub total_memory_bytes: u64,
    /// RAM available when detected, in bytes.
    pub available_memory_bytes: u64,
    /// GPUs usable by ragd (after hiding any the config hides).
    pub gpus: Vec<GpuInfo>,
    /// Compute backends compiled into this worker build.
    pub backends: Vec<Backend>,
    /// LLM endpoints the worker can reach locally.
    pub llm_endpoints: Vec<LlmEndpoint>,
}

/// A compute backend a worker build can run Candle on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Backend {
    /// CPU, always present.
    Cpu,
    /// NVIDIA CUDA (`cuda` cargo feature).
    Cuda,
    /// Apple Metal (`metal` cargo feature).
    Metal,
}

/// One GPU device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Which backend drives it.
    pub backend: Backend,
    /// Device ordinal within its backend.
    pub index: u32,
    /// Device name, e.g. "NVIDIA GeForce RTX 4090" or "Apple M2 Pro".
    pub name: String,
    /// Device memory in bytes (unified memory on Apple silicon).
    pub memory_bytes: u64,
    /// CUDA compute capability as (major, minor); `None` for other backends.
    pub compute_capability: Option<(u32, u32)>,
}

/// The API an LLM endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LlmApi {
    /// Ollama's native API (/api/tags, /api/chat).
    Ollama,
    /// An OpenAI-compatible API (/v1/models, /v1/chat/completions).
    OpenAiCompatible,
}

/// A reachable LLM endpoint and the models it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlmEndpoint {
    /// Name given in config (or "ollama" for the default Ollama endpoint).
    pub name: String,
    /// Which API it speaks.
    pub api: LlmApi,
    /// Base URL as configured (local to the worker; never dialled by anyone else).
    pub url: String,
    /// Models the endpoint lists.
    pub models: Vec<String>,
}

/// A worker's current load, sent with every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Work slots in use.
    pub busy_slots: u32,
    /// Work slots the worker offers in total.
    pub total_slots: u32,
    /// RAM available now, in bytes.
    pub available_memory_bytes: u64,
}

impl Capabilities {
    /// Whether any LLM endpoint with at least one model is reachable.
    pub fn has_llm(&self) -> bool {
        self.llm_endpoints.iter().any(|e| !e.models.is_empty())
    }

    /// The best backend for training: a GPU backend when a GPU is present, else CPU.
    pub fn best_backend(&self) -> Backend {
        self.gpus
            .iter()
            .map(|g| g.backend)
            .find(|b| matches!(b, Backend::Cuda))
            .or_else(|| self.gpus.iter().map(|g| g.backend).next())
            .unwrap_or(Backend::Cpu)
    }
}
