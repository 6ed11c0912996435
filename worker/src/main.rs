//! `ragd-worker`: runs on every machine of the cluster.
fn main() {}
