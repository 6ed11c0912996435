//! The ragd cluster worker.
