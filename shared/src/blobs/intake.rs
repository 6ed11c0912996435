//! What a blob store accepts from its peers' pushes, decided from the transfer header before any
//! body byte is written.
//!
//! A worker's store takes what its coordinator pushes ([`Intake::Open`]: that peer is the cluster's
//! authority). The coordinator's store takes only what it asked for ([`Intake::Expected`]): a
//! fetch registers an [`Expecting`] (which connection, which blob, from which offset, at most how
//! many bytes), the worker declares the length it sends, and a push is admitted only when it
//! matches, from the connection asked, of exactly the declared length. Anything else is stopped
//! with [`transfer::STOP_NOT_EXPECTED`] and logged. Both check the free disk space first.

use super::{BlobError, BlobStore};
use crate::protocol::jobs::BlobId;
use crate::transfer;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Free space kept back on the store's file system beyond the transfer itself.
pub const SPACE_RESERVE: u64 = 256 << 20;

/// How long an expected push waits for the fetch that asked for it to learn its length (the
/// worker answers the fetch request and starts the push at the same time).
const DECLARATION_WAIT: Duration = Duration::from_secs(10);

/// Which pushes a store accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Any blob (a worker's store: pushes come from its coordinator).
    Open,
    /// Only blobs a fetch of this store asked for, of the declared size (the coordinator's).
    Expected,
}

/// One fetch in flight.
#[derive(Debug, Clone)]
struct Expected {
    token: u64,
    connection: usize,
    blob: BlobId,
    offset: u64,
    /// Most bytes the whole blob may have.
    ceiling: u64,
    /// Body length the sender declared, once known.
    declared: Option<u64>,
}

/// The fetches in flight of a store (shared by its clones).
#[derive(Debug, Default)]
pub(super) struct Expectations {
    list: Mutex<Vec<Expected>>,
}

impl Expectations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Expected>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A registered fetch: pushes of its blob from its connection are admitted while it lives.
#[derive(Debug)]
pub struct Expecting {
    store: BlobStore,
    expectations: Arc<Expectations>,
    token: u64,
    blob: BlobId,
    offset: u64,
    ceiling: u64,
}

impl Expecting {
    /// Records the body length the sender announced (from `offset`); refused when the blob would
    /// exceed the ceiling or the disk lacks the space.
    pub fn declare(&self, len: u64) -> Result<(), BlobError> {
        if self.offset.saturating_add(len) > self.ceiling {
            return Err(BlobError::NotExpected {
                blob: self.blob,
                reason: format!(
                    "the sender declared {len} bytes from offset {}, more than the {} expected",
                    self.offset, self.ceiling
                ),
            });
        }
        self.store.check_space(len)?;
        if let Some(e) = self
            .expectations
            .lock()
            .iter_mut()
            .find(|e| e.token == self.token)
        {
            e.declared = Some(len);
        }
        Ok(())
    }
}

impl Drop for Expecting {
    fn drop(&mut self) {
        self.expectations.lock().retain(|e| e.token != self.token);
    }
}

impl BlobStore {
    /// Registers a fetch of `blob` from `offset` over the connection with quinn's
    /// `stable_id` `connection`; the whole blob may have at most `ceiling` bytes. Pushes are
    /// admitted until the returned guard is dropped. (Without effect on an open store.)
    pub fn expect(&self, connection: usize, blob: BlobId, offset: u64, ceiling: u64) -> Expecting {
        let token = rand::random();
        self.expectations.lock().push(Expected {
            token,
            connection,
            blob,
            offset,
            ceiling,
            declared: None,
        });
        Expecting {
            store: self.clone(),
            expectations: self.expectations.clone(),
            token,
            blob,
            offset,
            ceiling,
        }
    }

    /// Fails unless the store's file system has `len` bytes free plus [`SPACE_RESERVE`].
    pub fn check_space(&self, len: u64) -> Result<(), BlobError> {
        let Some(available) = available_space(self.root()) else {
            return Ok(());
        };
        let needed = len.saturating_add(SPACE_RESERVE);
        if available < needed {
            return Err(BlobError::NoSpace {
                path: self.root().to_path_buf(),
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Decides from a transfer header whether its body may be written: returns the body length
    /// to accept, or why not. For an expected store it waits (bounded) for the fetch to learn
    /// the declared length.
    pub(super) async fn admit(
        &self,
        connection: usize,
        blob: &BlobId,
        offset: u64,
        len: u64,
    ) -> Result<u64, BlobError> {
        let refuse = |reason: String| BlobError::NotExpected {
            blob: *blob,
            reason,
        };
        if self.intake == Intake::Expected {
            let start = Instant::now();
            loop {
                let found = self
                    .expectations
                    .lock()
                    .iter()
                    .find(|e| e.blob == *blob && e.connection == connection)
                    .cloned();
                let Some(e) = found else {
                    return Err(refuse(
                        "no fetch of it from this peer is in progress".into(),
                    ));
                };
                if e.offset != offset {
                    return Err(refuse(format!(
                        "asked from offset {}, the push starts at {offset}",
                        e.offset
                    )));
                }
                if offset.saturating_add(len) > e.ceiling {
                    return Err(refuse(format!(
                        "{len} bytes from offset {offset} exceed the {} expected",
                        e.ceiling
                    )));
                }
                match e.declared {
                    Some(declared) if declared == len => break,
                    Some(declared) => {
                        return Err(refuse(format!(
                            "the sender declared {declared} bytes and pushes {len}"
                        )))
                    }
                    None if start.elapsed() >= DECLARATION_WAIT => {
                        return Err(refuse("its length was never declared".into()))
                    }
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        self.check_space(len)?;
        Ok(len)
    }
}

/// Bytes available to this user on the file system holding `path` (`None` where unknown).
fn available_space(path: &std::path::Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let st = rustix::fs::statvfs(path).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// The stop code that tells a sender why its push was refused.
pub(super) fn stop_code(e: &BlobError) -> quinn::VarInt {
    match e {
        BlobError::NoSpace { .. } => transfer::STOP_NO_SPACE,
        _ => transfer::STOP_NOT_EXPECTED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(intake: Intake) -> (tempfile::TempDir, BlobStore) {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open_with(tmp.path(), intake).unwrap();
        (tmp, store)
    }

    #[tokio::test]
    async fn an_expected_store_admits_only_what_it_asked_for() {
        let (_tmp, store) = store(Intake::Expected);
        let blob = BlobId::of(b"model");
        let other = BlobId::of(b"junk");
        // Nothing asked for: refused at once.
        let e = store.admit(7, &blob, 0, 5).await.unwrap_err();
        assert!(e.to_string().contains("no fetch"), "{e}");
        let fetch = store.expect(7, blob, 0, 100);
        fetch.declare(5).unwrap();
        assert_eq!(store.admit(7, &blob, 0, 5).await.unwrap(), 5);
        // Another connection, another blob, another offset, another length: refused.
        assert!(store.admit(8, &blob, 0, 5).await.is_err());
        assert!(store.admit(7, &other, 0, 5).await.is_err());
        assert!(store.admit(7, &blob, 1, 4).await.is_err());
        let e = store.admit(7, &blob, 0, 6).await.unwrap_err();
        assert!(e.to_string().contains("declared 5"), "{e}");
        // A declaration above the ceiling is refused; the guard's end ends the admission.
        let e = store.expect(7, other, 10, 20).declare(11).unwrap_err();
        assert!(e.to_string().contains("more than the 20"), "{e}");
        drop(fetch);
        assert!(store.admit(7, &blob, 0, 5).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_waits_for_the_declaration_then_gives_up() {
        let (_tmp, store) = store(Intake::Expected);
        let blob = BlobId::of(b"checkpoint");
        let fetch = store.expect(1, blob, 0, 1000);
        let e = store.admit(1, &blob, 0, 10).await.unwrap_err();
        assert!(e.to_string().contains("never declared"), "{e}");
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.admit(1, &blob, 0, 10).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        fetch.declare(10).unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), 10);
        // A header above the ceiling is refused without waiting.
        assert!(store.admit(1, &blob, 0, 1001).await.is_err());
    }

    #[tokio::test]
    async fn an_open_store_admits_any_blob_that_fits_on_disk() {
        let (_tmp, store) = store(Intake::Open);
        assert_eq!(store.admit(3, &BlobId::of(b"x"), 0, 1).await.unwrap(), 1);
        let e = store
            .admit(3, &BlobId::of(b"x"), 0, u64::MAX / 2)
            .await
            .unwrap_err();
        assert!(matches!(e, BlobError::NoSpace { .. }), "{e}");
        assert!(e.to_string().contains("free"), "{e}");
    }
}
