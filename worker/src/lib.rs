//! The ragd cluster worker daemon: runs on every machine, advertises what the machine can do,
//! serves its cluster's coordinator, and runs the coordinator's tasks with the engine
//! (`ragd-engine`).
//!
//! - [`config`]: layered, validated configuration;
//! - [`capabilities`]: detection of CPU, RAM, GPUs, Candle backends and local LLM endpoints;
//! - [`enrolment`]: `join` and the identity it stores;
//! - [`server`]: the QUIC endpoint the coordinator dials (handshake, heartbeats, tasks);
//! - [`tasks`]: the coordinator's tasks on this machine (generate, prepare, train, calibrate);
//! - [`cli`]: the one-machine commands (`train`, `evaluate`, `train-reranker`, `rerank`,
//!   `generate-data`, `models`).

pub mod capabilities;
pub mod cli;
pub mod config;
pub mod enrolment;
pub mod server;
pub mod tasks;
