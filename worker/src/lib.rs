//! The ragd cluster worker.
pub mod cli_data;
pub mod data;
