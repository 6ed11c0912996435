//! Reading and writing identity files with safe permissions (Unix).

use super::error::{IdentityError, Result};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and parents) if missing; a directory this function creates gets mode 0700.
/// An existing directory is left as it is.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(IdentityError::io("create directory", dir))
}

/// Writes `contents` to `path` atomically (temporary file + rename) with the given mode.
/// Refuses to replace an existing file when `overwrite` is false.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32, overwrite: bool) -> Result<()> {
    if !overwrite && path.exists() {
        return Err(IdentityError::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // A stale temporary file from an interrupted save may exist with any mode: remove it so the
    // new one is created with ours.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(IdentityError::io("remove", &tmp)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(IdentityError::io("create", &tmp))?;
    // The umask may have removed bits from `mode` but never adds any; set it exactly anyway.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(IdentityError::io("set permissions of", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(IdentityError::io("write", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(IdentityError::io("rename into place", path))
}

/// Reads a public file (certificate) as text.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(IdentityError::io("read", path))
}

/// Reads a private key file, refusing it if group or others may read or write it.
pub(crate) fn read_private(path: &Path) -> Result<zeroize::Zeroizing<String>> {
    let meta = fs::metadata(path).map_err(IdentityError::io("read", path))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::InsecureKeyFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read_to_string(path)
        .map(zeroize::Zeroizing::new)
        .map_err(IdentityError::io("read", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_write_read_and_mode_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        ensure_private_dir(&sub).unwrap();
        assert_eq!(
            fs::metadata(&sub).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let key = sub.join("k.key");
        write_file(&key, b"secret", 0o600, false).unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_private(&key).unwrap().as_str(), "secret");

        let err = write_file(&key, b"other", 0o600, false).unwrap_err();
        assert!(matches!(err, IdentityError::AlreadyExists { .. }));
        write_file(&key, b"other", 0o600, true).unwrap();
        assert_eq!(read_private(&key).unwrap().as_str(), "other");

        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private(&key).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            IdentityError::InsecureKeyFile { mode: 0o644, .. }
        ));
        assert!(
            msg.contains("has mode 0644; ragd requires 0600: run chmod 600"),
            "{msg}"
        );
    }
}
