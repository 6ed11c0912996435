//! The one-machine commands of `ragd-worker`: each parses its clap arguments, runs the engine,
//! and prints what it did.
//!
//! - [`train`]: `train`, `evaluate`;
//! - [`rerank`]: `train-reranker`, `rerank`, `evaluate --reranker`;
//! - [`data`]: `generate-data`;
//! - [`models`]: `models list` / `models pull`;
//! - [`options`]: what the training commands share (optimisation and evaluation options,
//!   progress, Ctrl-C).

pub mod data;
pub mod models;
pub mod options;
pub mod rerank;
pub mod train;
