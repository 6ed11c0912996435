//! Helpers for ragd's cross-process integration tests and benchmarks.
pub mod standin;
