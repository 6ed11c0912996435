//! Helpers for ragd's cross-process integration tests and benchmarks.
//!
//! - [`cluster`]: runs real coordinator and worker processes on loopback;
//! - [`jobs`]: jobs on such a cluster (inputs, submit, wait);
//! - [`netns`]: a simulated LAN of network namespaces on a bridge, for mDNS tests;
//! - [`standin`]: protocol-faithful stand-ins for Ollama and OpenAI-compatible LLM servers.

pub mod cluster;
pub mod jobs;
pub mod netns;
pub mod standin;
