//! The ragd machine-learning engine and data pipeline, linked by both binaries (`ragd-worker`
//! and `ragd-coord`). It knows nothing of the cluster's daemons; of the wire protocol
//! (`ragd-shared`) it uses the plain data types a job carries (chunks, generated queries) and
//! converts its configurations to and from their wire form in [`settings`].
//!
//! Training and inference:
//! - [`embed`]: BERT-family encoders from differentiable ops, model loading, pooling, fused CPU kernels;
//! - [`train`]: losses, optimiser, sampler, checkpoints, LoRA, the one training loop;
//! - [`rerank`]: cross-encoder rerankers (model, losses, training, reranking evaluation, export);
//! - [`eval`]: information-retrieval metrics on BEIR-layout test sets;
//! - [`export`]: sentence-transformers model directories;
//! - [`device`]: device choice and memory estimates; [`alloc`]: the allocator and its guards;
//! - [`rng`]: seeded random streams; [`models`]: the catalogue of pullable GGUF / embedding models.
//!
//! Synthetic training data:
//! - [`data`]: ingestion, chunking, LLM backends, filters, hard-negative mining, splits, outputs,
//!   and the prepare step ([`data::prepare`]) both the coordinator and the worker run.

pub mod alloc;
pub mod data;
pub mod device;
pub mod embed;
pub mod eval;
pub mod export;
pub mod models;
pub mod rerank;
pub mod rng;
pub mod settings;
pub mod train;
