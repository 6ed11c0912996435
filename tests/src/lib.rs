//! Helpers for ragd's cross-process integration tests and benchmarks.
//!
//! - [`cluster`]: runs real coordinator and worker processes on loopback;
//! - [`netns`]: a simulated LAN of network namespaces on a bridge, for mDNS tests;
//! - [`standin`]: protocol-faithful stand-ins for Ollama and OpenAI-compatible LLM servers.

pub mod cluster;
pub mod netns;
pub mod standin;
