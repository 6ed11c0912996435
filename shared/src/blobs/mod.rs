//! Content-addressed blob stores (coordinator and workers) and blob transfers between them.
//!
//! A blob is a file named by the BLAKE3 hash of its bytes: `ROOT/objects/<hex>`. A directory
//! (a model, a checkpoint, a test set) is a [`Bundle`]: a JSON blob listing its files' relative
//! paths and blob ids, so a directory is moved by moving the blobs the receiver lacks.
//!
//! Transfers run on QUIC unidirectional streams in `transfer`'s format; the header name is
//! `blob:<hex>:<offset>` and the body is the blob's bytes from `offset`. The receiver appends the
//! body to `ROOT/partial/<hex>` (an interrupted transfer leaves its prefix there, and the next
//! push resumes at its length), checks the body against the header's hash, then hashes the whole
//! file: only a file whose hash is its name is renamed into `objects/`. Anything else (a corrupt
//! source, a lying sender) is deleted and reported, never used.

use crate::protocol::jobs::{BlobHoldings, BlobId};
use crate::transfer::{self, TransferError};
use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

mod bundle;
mod intake;
pub use bundle::{Bundle, BundleFile, BUNDLE_FORMAT, MAX_MANIFEST_LEN};
pub use intake::{Expecting, Intake};

/// Largest blob a store accepts from a peer (64 GiB).
pub const MAX_BLOB_LEN: u64 = 64 << 30;

/// Errors of blob stores and blob transfers.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Filesystem problem.
    #[error("blob store {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A blob is not in the store.
    #[error("blob {id} is not in the store at {root}")]
    Missing {
        /// The blob.
        id: BlobId,
        /// The store.
        root: PathBuf,
    },
    /// Received or stored bytes do not hash to their name.
    #[error("blob {id} failed verification: its bytes hash to {actual}; the copy was discarded")]
    Corrupt {
        /// The expected id.
        id: BlobId,
        /// What the bytes hash to.
        actual: BlobId,
    },
    /// A bundle manifest is not valid.
    #[error("bundle {id} is malformed: {message}")]
    BadBundle {
        /// The bundle.
        id: BlobId,
        /// What is wrong.
        message: String,
    },
    /// A transfer header is not a blob transfer.
    #[error("not a blob transfer: {name:?}")]
    BadName {
        /// The header's name.
        name: String,
    },
    /// The transfer itself failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A push this store did not ask for, or not of this size (refused before any byte of it
    /// was written).
    #[error("refused a push of blob {blob}: {reason}")]
    NotExpected {
        /// The blob pushed.
        blob: BlobId,
        /// What did not match.
        reason: String,
    },
    /// Not enough free disk space for a transfer.
    #[error("not enough disk space in {path}: {needed} bytes needed (the transfer and a reserve), {available} free; free some space or move the state directory to a larger disk")]
    NoSpace {
        /// The store's directory.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A content-addressed store on disk.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    receiving: Arc<Mutex<HashSet<BlobId>>>,
    intake: Intake,
    expectations: Arc<intake::Expectations>,
}

impl BlobStore {
    /// Opens (creating) the store at `root`; it accepts any push that fits on disk.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        Self::open_with(root, Intake::Open)
    }

    /// Opens (creating) the store at `root` with the given intake rule.
    pub fn open_with(root: &Path, intake: Intake) -> Result<Self, BlobError> {
        for sub in ["objects", "partial"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            receiving: Arc::default(),
            intake,
            expectations: Arc::default(),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a complete blob lives.
    pub fn path(&self, id: &BlobId) -> PathBuf {
        self.root.join("objects").join(id.to_hex())
    }

    fn partial_path(&self, id: &BlobId) -> PathBuf {
        self.root.join("partial").join(id.to_hex())
    }

    fn missing_or_io(&self, id: &BlobId, path: &Path, e: std::io::Error) -> BlobError {
        if e.kind() == std::io::ErrorKind::NotFound {
            BlobError::Missing {
                id: *id,
                root: self.root.clone(),
            }
        } else {
            io(path)(e)
        }
    }

    /// Whether the blob is held completely.
    pub fn has(&self, id: &BlobId) -> bool {
        self.path(id).is_file()
    }

    /// Whether every one of `ids` is held completely.
    pub fn has_all<'a>(&self, mut ids: impl Iterator<Item = &'a BlobId>) -> bool {
        ids.all(|id| self.has(id))
    }

    /// Bytes held of an interrupted transfer of `id` (0 when none).
    pub fn partial_len(&self, id: &BlobId) -> u64 {
        std::fs::metadata(self.partial_path(id)).map_or(0, |m| m.len())
    }

    /// Which of `ids` are missing, with the resume offset of each.
    pub fn holdings(&self, ids: &[BlobId]) -> BlobHoldings {
        BlobHoldings {
            missing: ids
                .iter()
                .map(|id| (!self.has(id)).then(|| self.partial_len(id)))
                .collect(),
        }
    }

    /// Stores `bytes`, returning their id.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<BlobId, BlobError> {
        let id = BlobId::of(bytes);
        if !self.has(&id) {
            let tmp = self
                .root
                .join("partial")
                .join(format!(".put.{:016x}", rand::random::<u64>()));
            std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
            let dest = self.path(&id);
            std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        }
        Ok(id)
    }

    /// Copies the file at `path` into the store.
    pub fn put_file(&self, path: &Path) -> Result<(BlobId, u64), BlobError> {
        let (id, len) = hash_path(path)?;
        if !self.has(&id) {
            let tmp = self
                .root
                .join("partial")
                .join(format!(".put.{:016x}", rand::random::<u64>()));
            std::fs::copy(path, &tmp).map_err(io(path))?;
            let dest = self.path(&id);
            std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        }
        Ok((id, len))
    }

    /// Reads a whole blob, verifying its hash.
    pub fn read(&self, id: &BlobId) -> Result<Vec<u8>, BlobError> {
        let path = self.path(id);
        let bytes = std::fs::read(&path).map_err(|e| self.missing_or_io(id, &path, e))?;
        let actual = BlobId::of(&bytes);
        if actual != *id {
            let _ = std::fs::remove_file(&path);
            return Err(BlobError::Corrupt { id: *id, actual });
        }
        Ok(bytes)
    }

    /// Stores every regular file under `dir` and a bundle listing them; returns the bundle id.
    pub fn put_dir(&self, dir: &Path) -> Result<BlobId, BlobError> {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).map_err(io(&d))? {
                let entry = entry.map_err(io(&d))?;
                let p = entry.path();
                let ft = entry.file_type().map_err(io(&p))?;
                if ft.is_dir() {
                    stack.push(p);
                } else if ft.is_file() {
                    let rel = p.strip_prefix(dir).unwrap_or(&p);
                    let rel: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    let (blob, len) = self.put_file(&p)?;
                    files.push(BundleFile {
                        path: rel.join("/"),
                        blob,
                        len,
                    });
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let bundle = Bundle {
            format: BUNDLE_FORMAT.into(),
            files,
        };
        let json = serde_json::to_vec_pretty(&bundle).expect("bundle serialises");
        self.put_bytes(&json)
    }

    /// Reads and checks a bundle manifest.
    pub fn bundle(&self, id: &BlobId) -> Result<Bundle, BlobError> {
        let bytes = self.read(id)?;
        Bundle::parse(&bytes).map_err(|message| BlobError::BadBundle { id: *id, message })
    }

    /// Writes the bundle's files under `dest` (created; existing files are replaced).
    pub fn materialize(&self, id: &BlobId, dest: &Path) -> Result<(), BlobError> {
        let bundle = self.bundle(id)?;
        for f in &bundle.files {
            let src = self.path(&f.blob);
            if !src.is_file() {
                return Err(BlobError::Missing {
                    id: f.blob,
                    root: self.root.clone(),
                });
            }
            let target = dest.join(&f.path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::copy(&src, &target).map_err(io(&target))?;
        }
        Ok(())
    }

    /// Receives one blob transfer from `stream`, which arrived on the connection with quinn's
    /// `stable_id` `connection`, into the store; returns the completed blob. The header is
    /// checked against the store's intake rule and free space before any body byte is written.
    pub async fn receive(
        &self,
        stream: &mut quinn::RecvStream,
        connection: usize,
    ) -> Result<BlobId, BlobError> {
        let header = transfer::read_header(stream).await?;
        let (id, offset) = match parse_transfer_name(&header.name) {
            Ok(v) => v,
            Err(e) => {
                let _ = stream.stop(transfer::STOP_BAD_HEADER);
                return Err(e);
            }
        };
        if self.has(&id) {
            let _ = stream.stop(transfer::STOP_ALREADY_HELD);
            return Ok(id);
        }
        let len = match self.admit(connection, &id, offset, header.total_len).await {
            Ok(len) => len,
            Err(e) => {
                let _ = stream.stop(intake::stop_code(&e));
                return Err(e);
            }
        };
        {
            let mut busy = self.receiving.lock().unwrap_or_else(|p| p.into_inner());
            if !busy.insert(id) {
                let _ = stream.stop(transfer::STOP_ALREADY_HELD);
                return Err(BlobError::Io {
                    path: self.partial_path(&id),
                    source: std::io::Error::other("another transfer of this blob is in progress"),
                });
            }
        }
        // The body goes to a per-transfer spill file first, appended to the partial file once
        // its own hash is verified.
        let spill = self
            .root
            .join("partial")
            .join(format!(".in.{:016x}", rand::random::<u64>()));
        let result = self
            .receive_via(stream, header, len, id, offset, &spill)
            .await;
        let _ = std::fs::remove_file(&spill);
        self.receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        result
    }

    async fn receive_via(
        &self,
        stream: &mut quinn::RecvStream,
        header: transfer::TransferHeader,
        len: u64,
        id: BlobId,
        offset: u64,
        spill: &Path,
    ) -> Result<BlobId, BlobError> {
        let file = tokio::fs::File::create(spill).await.map_err(io(spill))?;
        transfer::receive_body(stream, header, len, file).await?;
        let this = self.clone();
        let spill = spill.to_path_buf();
        tokio::task::spawn_blocking(move || this.append_and_seal(&id, offset, &spill))
            .await
            .unwrap_or_else(|e| {
                Err(BlobError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
            .map(|()| id)
    }

    /// Appends the verified segment in `spill` at `offset` of the partial file, then seals the
    /// blob if the whole file hashes to `id`.
    fn append_and_seal(&self, id: &BlobId, offset: u64, spill: &Path) -> Result<(), BlobError> {
        let partial = self.partial_path(id);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial)
            .map_err(io(&partial))?;
        let held = file.metadata().map_err(io(&partial))?.len();
        if offset > held {
            return Err(BlobError::Io {
                path: partial,
                source: std::io::Error::other(format!(
                    "segment starts at {offset} but only {held} bytes are held"
                )),
            });
        }
        file.set_len(offset).map_err(io(&partial))?;
        file.seek(SeekFrom::Start(offset)).map_err(io(&partial))?;
        let mut src = std::fs::File::open(spill).map_err(io(spill))?;
        std::io::copy(&mut src, &mut file).map_err(io(&partial))?;
        file.flush().map_err(io(&partial))?;
        file.sync_all().map_err(io(&partial))?;
        drop(file);
        let (actual, _) = hash_path(&partial)?;
        if actual != *id {
            let _ = std::fs::remove_file(&partial);
            tracing::warn!(blob = %id, %actual, "received blob failed verification; discarded");
            return Err(BlobError::Corrupt { id: *id, actual });
        }
        let dest = self.path(id);
        std::fs::rename(&partial, &dest).map_err(io(&dest))?;
        Ok(())
    }

    /// Sends blob `id` from `offset` on a new unidirectional stream of `conn`.
    pub async fn push(
        &self,
        conn: &quinn::Connection,
        id: &BlobId,
        offset: u64,
    ) -> Result<u64, BlobError> {
        let path = self.path(id);
        let this = self.clone();
        let id = *id;
        let (segment_hash, len) =
            tokio::task::spawn_blocking(move || this.segment_hash(&id, offset))
                .await
                .map_err(|e| BlobError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })??;
        let mut file = tokio::fs::File::open(&path).await.map_err(io(&path))?;
        use tokio::io::AsyncSeekExt;
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(io(&path))?;
        let mut stream = conn.open_uni().await?;
        let name = format!("blob:{}:{offset}", id.to_hex());
        match transfer::send_blob(&mut stream, &name, len, file, segment_hash).await {
            Ok(_) => Ok(len),
            Err(TransferError::StoppedByPeer { code })
                if code == transfer::STOP_ALREADY_HELD.into_inner() =>
            {
                Ok(0)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn segment_hash(&self, id: &BlobId, offset: u64) -> Result<([u8; 32], u64), BlobError> {
        let path = self.path(id);
        let mut file = std::fs::File::open(&path).map_err(|e| self.missing_or_io(id, &path, e))?;
        let total = file.metadata().map_err(io(&path))?.len();
        let offset = offset.min(total);
        file.seek(SeekFrom::Start(offset)).map_err(io(&path))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io(&path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok((*hasher.finalize().as_bytes(), total - offset))
    }
}

/// BLAKE3 id and length of a file.
pub fn hash_path(path: &Path) -> Result<(BlobId, u64), BlobError> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(std::io::BufReader::with_capacity(1 << 20, file))
        .map_err(io(path))?;
    Ok((BlobId(*hasher.finalize().as_bytes()), hasher.count()))
}

/// The blob and offset a blob transfer's header name (`blob:<hex>:<offset>`) names.
pub fn parse_transfer_name(name: &str) -> Result<(BlobId, u64), BlobError> {
    let bad = || BlobError::BadName {
        name: name.to_string(),
    };
    let rest = name.strip_prefix("blob:").ok_or_else(bad)?;
    let (hex, offset) = rest.split_once(':').ok_or_else(bad)?;
    let id = BlobId::from_hex(hex).ok_or_else(bad)?;
    let offset = offset.parse::<u64>().map_err(|_| bad())?;
    Ok((id, offset))
}

/// Accepts blob transfers on `conn` into `store` until the connection ends or `cancel` fires,
/// each admitted by the store's intake rule. Each received (or refused) blob is logged; the
/// sender learns the outcome by querying holdings.
pub async fn accept_blobs(conn: quinn::Connection, store: BlobStore, cancel: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let mut stream = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            s = conn.accept_uni() => match s { Ok(s) => s, Err(_) => break },
        };
        let store = store.clone();
        let (connection, peer) = (conn.stable_id(), conn.remote_address());
        tasks.spawn(async move {
            match store.receive(&mut stream, connection).await {
                Ok(id) => tracing::debug!(blob = %id, "blob received"),
                Err(BlobError::Transfer(e)) if e.is_cancelled_by_sender() => {
                    tracing::debug!(%peer, error = %e, "blob transfer called off by the sender")
                }
                Err(e) => tracing::warn!(%peer, error = %e, "blob transfer failed"),
            }
        });
    }
    tasks.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_round_trip_and_refuse_escaping_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&tmp.path().join("s")).unwrap();
        let dir = tmp.path().join("model");
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join("1_Pooling/config.json"), b"{\"x\":1}").unwrap();
        let id = store.put_dir(&dir).unwrap();
        let b = store.bundle(&id).unwrap();
        let paths: Vec<&str> = b.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["1_Pooling/config.json", "config.json"]);
        assert_eq!(store.put_dir(&dir).unwrap(), id, "same content, same id");
        let out = tmp.path().join("out");
        store.materialize(&id, &out).unwrap();
        assert_eq!(
            std::fs::read(out.join("1_Pooling/config.json")).unwrap(),
            b"{\"x\":1}"
        );
        let evil = Bundle {
            format: BUNDLE_FORMAT.into(),
            files: vec![BundleFile {
                path: "../x".into(),
                blob: BlobId::of(b""),
                len: 0,
            }],
        };
        let evil_id = store
            .put_bytes(&serde_json::to_vec(&evil).unwrap())
            .unwrap();
        let e = store.bundle(&evil_id).unwrap_err();
        assert!(e.to_string().contains("leaves the bundle"), "{e}");
    }

    #[test]
    fn corrupt_blobs_are_detected_and_discarded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let id = store.put_bytes(b"training data").unwrap();
        std::fs::write(store.path(&id), b"tampered data").unwrap();
        assert!(matches!(store.read(&id), Err(BlobError::Corrupt { .. })));
        assert!(!store.has(&id));
    }

    #[test]
    fn segments_resume_and_a_bad_prefix_is_discarded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let id = BlobId::of(&data);
        let spill = tmp.path().join("spill");
        std::fs::write(&spill, &data[..4000]).unwrap();
        // An incomplete prefix: stays partial, not sealed.
        assert!(store.append_and_seal(&id, 0, &spill).is_err());
        assert_eq!(store.partial_len(&id), 0, "a wrong whole is discarded");
        // Interrupted transfer: the prefix is on disk as partial.
        std::fs::write(store.partial_path(&id), &data[..4000]).unwrap();
        assert_eq!(store.holdings(&[id]).missing, vec![Some(4000)]);
        std::fs::write(&spill, &data[4000..]).unwrap();
        store.append_and_seal(&id, 4000, &spill).unwrap();
        assert!(store.has(&id));
        assert_eq!(store.holdings(&[id]).missing, vec![None]);
        // A corrupted prefix makes the whole fail and is thrown away.
        let id2 = BlobId::of(b"abcdefgh");
        std::fs::write(store.partial_path(&id2), b"abXd").unwrap();
        std::fs::write(&spill, b"efgh").unwrap();
        assert!(matches!(
            store.append_and_seal(&id2, 4, &spill),
            Err(BlobError::Corrupt { .. })
        ));
        assert_eq!(store.partial_len(&id2), 0);
    }

    #[test]
    fn names_parse() {
        let id = BlobId::of(b"x");
        assert_eq!(
            parse_transfer_name(&format!("blob:{}:12", id.to_hex())).unwrap(),
            (id, 12)
        );
        assert!(parse_transfer_name("model.safetensors").is_err());
        assert!(parse_transfer_name("blob:zz:1").is_err());
    }
}
