//! The ragd cluster worker: sentence-embedding training engine (model loading, training,
//! evaluation, export) and, later, cluster networking.

pub mod cli_train;
pub mod device;
pub mod embed;
pub mod eval;
pub mod export;
pub mod rng;
pub mod train;
