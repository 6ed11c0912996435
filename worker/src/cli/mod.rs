//! The one-machine commands of `ragd-worker`: each parses its clap arguments, runs the engine,
//! and prints what it did.
//!
//! - [`train`] runs `train` and `evaluate`;
//! - [`rerank`] runs `train-reranker`, `rerank` and `evaluate --reranker`;
//! - [`data`] runs `generate-data`;
//! - [`models`] runs `models list` and `models pull`;
//! - [`options`] holds what the training commands share (optimisation and evaluation options,
//!   progress, Ctrl-C).

pub mod data;
pub mod models;
pub mod options;
pub mod rerank;
pub mod train;
