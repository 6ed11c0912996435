//! Writing a job's models where the user asked (`--out DIR`, `DIR-reranker`) without ever
//! deleting what ragd did not write there.
//!
//! A destination may receive an export when it is absent, an empty directory, or a directory a
//! previous export wrote (it holds [`MARKER`]): of the same job (a resumed export), or of another
//! job when the user passed `--force`. Anything else is refused before the job starts and again
//! before the export. The model is laid out beside the destination and swapped into place, so a
//! crash leaves the old model or the new one, never half of each.

use ragd_shared::blobs::BlobStore;
use ragd_shared::protocol::jobs::BlobId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file an export leaves in its directory: which job wrote it, and what.
pub const MARKER: &str = ".ragd-export.json";

/// Why a destination cannot receive an export, or the export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The destination holds files ragd did not write.
    #[error("{path} is not empty and was not written by ragd: nothing is replaced there; give --out an empty or new directory")]
    Foreign {
        /// The destination.
        path: PathBuf,
    },
    /// The destination holds another job's export and `--force` was not given.
    #[error("{path} holds the {kind} exported by {job}; pass --force to replace it, or give --out another directory")]
    OtherJob {
        /// The destination.
        path: PathBuf,
        /// The job whose export is there.
        job: String,
        /// What it exported.
        kind: String,
    },
    /// The destination is a file, not a directory.
    #[error("{path} is a file; give --out a directory")]
    NotADirectory {
        /// The destination.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The model bundle could not be laid out.
    #[error("laying out the model: {0}")]
    Blob(#[from] ragd_shared::blobs::BlobError),
}

/// What [`MARKER`] records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Marker {
    job: String,
    kind: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_marker(dir: &Path) -> Option<Marker> {
    let text = std::fs::read_to_string(dir.join(MARKER)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Checks that `dest` may receive the export of `job` (`None`: a job not yet created, which
/// no previous export belongs to); `force` allows replacing another job's export.
pub fn check_destination(dest: &Path, job: Option<&str>, force: bool) -> Result<(), ExportError> {
    let meta = match std::fs::symlink_metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dest)(e)),
    };
    if !meta.is_dir() {
        return Err(ExportError::NotADirectory {
            path: dest.to_path_buf(),
        });
    }
    let empty = std::fs::read_dir(dest).map_err(io(dest))?.next().is_none();
    if empty {
        return Ok(());
    }
    match read_marker(dest) {
        Some(m) if Some(m.job.as_str()) == job || force => Ok(()),
        Some(m) => Err(ExportError::OtherJob {
            path: dest.to_path_buf(),
            job: m.job,
            kind: m.kind,
        }),
        None => Err(ExportError::Foreign {
            path: dest.to_path_buf(),
        }),
    }
}

/// Lays bundle `model` out as `dest` for `job` (`kind`: `embedder` or `reranker`): checked as
/// [`check_destination`] says, written beside `dest` with its marker, then swapped into place.
pub fn export_bundle(
    blobs: &BlobStore,
    model: &BlobId,
    dest: &Path,
    job: &str,
    kind: &str,
    force: bool,
) -> Result<(), ExportError> {
    check_destination(dest, Some(job), force)?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let name = dest
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let incoming = parent.join(format!(".{name}.incoming-{job}"));
    let _ = std::fs::remove_dir_all(&incoming);
    blobs.materialize(model, &incoming)?;
    let marker = serde_json::to_vec_pretty(&Marker {
        job: job.to_string(),
        kind: kind.to_string(),
    })
    .expect("marker serialises");
    std::fs::write(incoming.join(MARKER), marker).map_err(io(&incoming))?;
    swap_into_place(&incoming, dest)
}

/// Moves `incoming` to `dest`. An absent or empty `dest` is replaced by one rename; a previous
/// export is exchanged with `incoming` atomically (Linux) and then removed.
fn swap_into_place(incoming: &Path, dest: &Path) -> Result<(), ExportError> {
    if std::fs::rename(incoming, dest).is_ok() {
        return Ok(());
    }
    exchange(incoming, dest)?;
    // `incoming` now holds the previous export (its marker was checked).
    std::fs::remove_dir_all(incoming).map_err(io(incoming))
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<(), ExportError> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(|e| ExportError::Io {
        path: b.to_path_buf(),
        source: e.into(),
    })
}

#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> Result<(), ExportError> {
    // No atomic exchange: move the previous export aside first (a crash between the two
    // renames leaves it there, beside the destination, under `.NAME.previous`).
    let aside = b.with_file_name(format!(
        ".{}.previous",
        b.file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
    ));
    let _ = std::fs::remove_dir_all(&aside);
    std::fs::rename(b, &aside).map_err(io(b))?;
    std::fs::rename(a, b).map_err(io(b))?;
    std::fs::rename(&aside, a).map_err(io(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(blobs: &BlobStore, dir: &Path, weights: &[u8]) -> BlobId {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), weights).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        blobs.put_dir(dir).unwrap()
    }

    #[test]
    fn foreign_files_are_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&tmp.path().join("blobs")).unwrap();
        let m = model(&blobs, &tmp.path().join("m"), b"new");
        let dest = tmp.path().join("out");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("thesis.tex"), b"years of work").unwrap();
        for force in [false, true] {
            let err = export_bundle(&blobs, &m, &dest, "job-1", "embedder", force).unwrap_err();
            assert!(matches!(err, ExportError::Foreign { .. }), "{err}");
            assert!(err.to_string().contains("not written by ragd"), "{err}");
        }
        assert_eq!(
            std::fs::read(dest.join("thesis.tex")).unwrap(),
            b"years of work"
        );
        assert!(check_destination(&dest, None, true).is_err());
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            check_destination(&file, None, false),
            Err(ExportError::NotADirectory { .. })
        ));
    }

    #[test]
    fn exports_go_to_new_or_empty_dirs_and_replace_only_ragd_exports() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(&tmp.path().join("blobs")).unwrap();
        let old = model(&blobs, &tmp.path().join("a"), b"old");
        let new = model(&blobs, &tmp.path().join("b"), b"new");
        // New directory, then an empty one.
        let dest = tmp.path().join("out/model");
        export_bundle(&blobs, &old, &dest, "job-1", "embedder", false).unwrap();
        assert_eq!(
            std::fs::read(dest.join("model.safetensors")).unwrap(),
            b"old"
        );
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        export_bundle(&blobs, &old, &empty, "job-1", "embedder", false).unwrap();
        // The same job again (a resumed export) replaces its own output.
        export_bundle(&blobs, &new, &dest, "job-1", "embedder", false).unwrap();
        assert_eq!(
            std::fs::read(dest.join("model.safetensors")).unwrap(),
            b"new"
        );
        // Another job needs --force.
        let err = export_bundle(&blobs, &old, &dest, "job-2", "embedder", false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(
            std::fs::read(dest.join("model.safetensors")).unwrap(),
            b"new"
        );
        export_bundle(&blobs, &old, &dest, "job-2", "embedder", true).unwrap();
        assert_eq!(
            std::fs::read(dest.join("model.safetensors")).unwrap(),
            b"old"
        );
        assert_eq!(read_marker(&dest).unwrap().job, "job-2");
        // Nothing is left beside the destination.
        let left: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("model")]);
    }
}
