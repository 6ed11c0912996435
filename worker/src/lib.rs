//! The ragd cluster worker: runs on every machine, advertises what the machine can do, serves its
//! cluster's coordinator, and runs the machine-learning work.
//!
//! Cluster side:
//! - [`config`]: layered, validated configuration;
//! - [`capabilities`]: detection of CPU, RAM, GPUs, Candle backends and local LLM endpoints;
//! - [`enrolment`]: `join` and the identity it stores;
//! - [`server`]: the QUIC endpoint the coordinator dials (handshake, heartbeats).
//!
//! Training engine (usable on one machine):
//! - [`embed`]: BERT-family encoders from differentiable ops, model loading, pooling;
//! - [`train`]: losses, optimizer, sampler, checkpoints, LoRA, the training loop;
//! - [`eval`]: information-retrieval metrics on BEIR-layout test sets;
//! - [`export`]: sentence-transformers model directories;
//! - [`device`]: device choice and memory estimates; [`cli_train`]: the `train` / `evaluate` commands.
//!
//! - [`rerank`]: cross-encoder rerankers (model, losses, training, reranking evaluation, export).
//!
//! Synthetic training data (usable on one machine):
//! - [`data`]: ingestion, chunking, LLM backends, filters, hard-negative mining, splits, outputs;
//! - [`cli_data`]: the `generate-data` command.

pub mod alloc;
pub mod capabilities;
pub mod cli_data;
pub mod cli_models;
pub mod cli_rerank;
pub mod cli_train;
pub mod config;
pub mod data;
pub mod device;
pub mod embed;
pub mod enrolment;
pub mod eval;
pub mod export;
pub mod models;
pub mod rerank;
pub mod rng;
pub mod server;
pub mod tasks;
pub mod train;
