//! The ragd cluster coordinator.
