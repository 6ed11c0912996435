//! `ragd-coord`: the ragd cluster coordinator daemon and its admin CLI.
fn main() {}
