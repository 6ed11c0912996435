//! The ragd cluster worker.

pub mod capabilities;
