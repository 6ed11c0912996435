//! A directory as a list of blobs: the manifest format and its checks.

use crate::protocol::jobs::BlobId;
use serde::{Deserialize, Serialize};
use std::path::{Component, Path};

/// The `format` of every bundle manifest.
pub const BUNDLE_FORMAT: &str = "ragd-bundle-1";

/// Largest manifest accepted (a model has a dozen files; this allows ~100k).
pub const MAX_MANIFEST_LEN: u64 = 16 << 20;

/// One file of a [`Bundle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    /// Path relative to the bundle's root, `/`-separated.
    pub path: String,
    /// The file's blob.
    pub blob: BlobId,
    /// Its length in bytes.
    pub len: u64,
}

/// A directory as a list of blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Always `"ragd-bundle-1"`.
    pub format: String,
    /// The files, sorted by path.
    pub files: Vec<BundleFile>,
}

impl Bundle {
    /// Total bytes of the files.
    pub fn total_len(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    /// Parses and checks a manifest: the known format, every path relative and inside the
    /// bundle, no path twice, no file above the blob limit. Says what is wrong otherwise.
    pub fn parse(bytes: &[u8]) -> Result<Bundle, String> {
        if bytes.len() as u64 > MAX_MANIFEST_LEN {
            return Err(format!(
                "manifest of {} bytes is above the {MAX_MANIFEST_LEN}-byte limit",
                bytes.len()
            ));
        }
        let bundle: Bundle = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if bundle.format != BUNDLE_FORMAT {
            return Err(format!("unknown format {:?}", bundle.format));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &bundle.files {
            let inside = !f.path.is_empty()
                && !f.path.contains('\\')
                && Path::new(&f.path)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
            if !inside {
                return Err(format!("file path {:?} leaves the bundle", f.path));
            }
            if !seen.insert(f.path.as_str()) {
                return Err(format!("file path {:?} is listed twice", f.path));
            }
            if f.len > super::MAX_BLOB_LEN {
                return Err(format!(
                    "file {:?} of {} bytes is above the blob limit",
                    f.path, f.len
                ));
            }
        }
        Ok(bundle)
    }
}
