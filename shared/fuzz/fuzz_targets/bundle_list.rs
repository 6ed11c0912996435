//! Feeds arbitrary bytes to the bundle manifest parser (the JSON list of a directory's files
//! that a peer's blob names), which decides which paths a bundle may write.
//!
//! Checks: no panic; an accepted manifest has the known format, only relative paths inside the
//! bundle, no path twice, and serialises to a manifest that parses to the same list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ragd_shared::blobs::{Bundle, BUNDLE_FORMAT};
use std::path::{Component, Path};

fuzz_target!(|data: &[u8]| {
    let Ok(bundle) = Bundle::parse(data) else {
        return;
    };
    assert_eq!(bundle.format, BUNDLE_FORMAT);
    let mut seen = std::collections::HashSet::new();
    for f in &bundle.files {
        assert!(!f.path.is_empty() && !f.path.contains('\\'));
        assert!(Path::new(&f.path)
            .components()
            .all(|c| matches!(c, Component::Normal(_))));
        assert!(seen.insert(f.path.clone()), "{:?} twice", f.path);
    }
    let json = serde_json::to_vec(&bundle).expect("a bundle serialises");
    assert_eq!(Bundle::parse(&json).expect("and parses again"), bundle);
});
