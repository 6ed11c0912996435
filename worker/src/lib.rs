//! The ragd cluster worker: runs on every machine, advertises what the machine can do, and
//! serves its cluster's coordinator.
//!
//! - [`config`]: layered, validated configuration;
//! - [`capabilities`]: detection of CPU, RAM, GPUs, Candle backends and local LLM endpoints;
//! - [`enrolment`]: `join` and the identity it stores;
//! - [`server`]: the QUIC endpoint the coordinator dials (handshake, heartbeats).

pub mod capabilities;
pub mod config;
pub mod enrolment;
pub mod server;
