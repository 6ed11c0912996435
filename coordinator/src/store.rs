//! The coordinator's durable state: an SQLite database in the state directory.
//!
//! It holds the coordinator's id, the join secret and the enrolled workers (with the fingerprint
//! of the one certificate each may use, and when it was removed). Every change is one transaction.

use ragd_shared::identity::{Fingerprint, JoinSecret};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        source: rusqlite::Error,
    },
    /// The database has no coordinator identity: `init` was not run.
    #[error("the coordinator state in {0} is not initialised: run `ragd-coord init` first")]
    NotInitialised(PathBuf),
    /// A stored value is corrupt.
    #[error("state database {path}: stored {what} is corrupt; restore the state directory from a backup or re-run `ragd-coord init --force`")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// Which value.
        what: &'static str,
    },
    /// The system's random number generator failed.
    #[error("cannot generate a join secret: {0}")]
    Random(String),
    /// No such worker.
    #[error("no enrolled worker has id {0:?}; `ragd-coord workers` lists them")]
    UnknownWorker(String),
    /// A worker with this id is enrolled and was not removed.
    #[error("a worker named {0:?} is already enrolled: give this one another name (`ragd-worker join TOKEN --name NAME`), or, if this machine replaces it, run `ragd-coord workers replace {0}` on the coordinator first")]
    AlreadyEnrolled(String),
}

fn secret_hex(secret: &JoinSecret) -> String {
    data_encoding::HEXLOWER.encode(&secret.0)
}

fn secret_from_hex(hex: &str) -> Option<JoinSecret> {
    let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).ok()?;
    Some(JoinSecret(bytes.try_into().ok()?))
}

/// One enrolled worker as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledWorker {
    /// The worker's id.
    pub id: String,
    /// Fingerprint of the certificate issued to it at enrolment.
    pub cert_fingerprint: Fingerprint,
    /// When it enrolled (unix ms).
    pub enrolled_at_ms: u64,
    /// When it was removed (unix ms), if it was.
    pub removed_at_ms: Option<u64>,
}

/// Handle to the state database.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) `state.db` in `dir`, with owner-only permissions.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("state.db");
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS workers (
                 id TEXT PRIMARY KEY,
                 cert_fingerprint TEXT NOT NULL,
                 enrolled_at INTEGER NOT NULL,
                 removed_at INTEGER
             );",
        )
        .map_err(err)?;
        Ok(Self {
            path,
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
    }

    /// Records the coordinator's id and first join secret (one transaction).
    pub fn initialise(&self, coordinator_id: &str, secret: &JoinSecret) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('coordinator_id', ?1)",
                [coordinator_id],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('join_secret', ?1)",
                [secret_hex(secret)],
            )?;
            tx.commit()
        })
    }

    /// The coordinator's id.
    pub fn coordinator_id(&self) -> Result<String, StoreError> {
        self.meta("coordinator_id")?
            .ok_or_else(|| StoreError::NotInitialised(self.path.clone()))
    }

    /// The current join secret.
    pub fn join_secret(&self) -> Result<JoinSecret, StoreError> {
        let hex = self
            .meta("join_secret")?
            .ok_or_else(|| StoreError::NotInitialised(self.path.clone()))?;
        secret_from_hex(&hex).ok_or_else(|| StoreError::Corrupt {
            path: self.path.clone(),
            what: "join secret",
        })
    }

    /// Replaces the join secret; tokens carrying the old one stop working at once.
    pub fn rotate_join_secret(&self) -> Result<JoinSecret, StoreError> {
        let secret = JoinSecret::generate().map_err(|e| StoreError::Random(e.to_string()))?;
        self.with(|c| {
            c.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'join_secret'",
                [secret_hex(&secret)],
            )
        })?;
        Ok(secret)
    }

    /// Whether `id` is enrolled and not removed.
    pub fn is_enrolled(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT 1 FROM workers WHERE id = ?1 AND removed_at IS NULL",
                [id],
                |_| Ok(()),
            )
            .optional()
        })
        .map(|row| row.is_some())
    }

    /// Records an enrolment. A removed worker's id may enrol again (with a new certificate); an
    /// id that is enrolled and not removed is refused ([`StoreError::AlreadyEnrolled`]), so the
    /// join token alone cannot take over a worker's name.
    pub fn enrol(&self, id: &str, fingerprint: &Fingerprint) -> Result<(), StoreError> {
        let changed = self.with(|c| {
            c.execute(
                "INSERT INTO workers (id, cert_fingerprint, enrolled_at, removed_at)
                 VALUES (?1, ?2, ?3, NULL)
                 ON CONFLICT(id) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint,
                     enrolled_at = excluded.enrolled_at, removed_at = NULL
                 WHERE workers.removed_at IS NOT NULL",
                params![id, fingerprint.to_string(), now_ms() as i64],
            )
        })?;
        if changed == 0 {
            return Err(StoreError::AlreadyEnrolled(id.to_string()));
        }
        Ok(())
    }

    /// Marks a worker removed: its certificate is refused from now on.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.remove_rotating(id, false).map(|_| ())
    }

    /// Marks a worker removed and, when `rotate` is set, replaces the join secret in the same
    /// transaction (the removed machine knew it); returns the new secret.
    pub fn remove_rotating(
        &self,
        id: &str,
        rotate: bool,
    ) -> Result<Option<JoinSecret>, StoreError> {
        let secret = match rotate {
            true => Some(JoinSecret::generate().map_err(|e| StoreError::Random(e.to_string()))?),
            false => None,
        };
        let changed = self.with(|c| {
            let tx = c.transaction()?;
            let changed = tx.execute(
                "UPDATE workers SET removed_at = ?2 WHERE id = ?1 AND removed_at IS NULL",
                params![id, now_ms() as i64],
            )?;
            if let (1, Some(secret)) = (changed, &secret) {
                tx.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'join_secret'",
                    [secret_hex(secret)],
                )?;
            }
            tx.commit()?;
            Ok(changed)
        })?;
        if changed == 0 {
            return Err(StoreError::UnknownWorker(id.to_string()));
        }
        Ok(secret)
    }

    /// Every worker ever enrolled, removed ones included.
    pub fn workers(&self) -> Result<Vec<EnrolledWorker>, StoreError> {
        let rows = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, cert_fingerprint, enrolled_at, removed_at FROM workers ORDER BY id",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(id, fp, enrolled, removed)| {
                Ok(EnrolledWorker {
                    cert_fingerprint: fp.parse().map_err(|_| StoreError::Corrupt {
                        path: self.path.clone(),
                        what: "certificate fingerprint",
                    })?,
                    id,
                    enrolled_at_ms: enrolled as u64,
                    removed_at_ms: removed.map(|v| v as u64),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrol_remove_and_rotate_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            store.coordinator_id(),
            Err(StoreError::NotInitialised(_))
        ));
        let secret = JoinSecret::generate().unwrap();
        store.initialise("coord", &secret).unwrap();
        let fp = Fingerprint::of_der(b"cert");
        store.enrol("w1", &fp).unwrap();
        store.enrol("w2", &fp).unwrap();
        store.remove("w2").unwrap();
        assert!(matches!(
            store.remove("w2"),
            Err(StoreError::UnknownWorker(_))
        ));
        let rotated = store.rotate_join_secret().unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.coordinator_id().unwrap(), "coord");
        assert_eq!(
            secret_hex(&store.join_secret().unwrap()),
            secret_hex(&rotated)
        );
        assert_ne!(secret_hex(&rotated), secret_hex(&secret));
        let workers = store.workers().unwrap();
        assert_eq!(workers.len(), 2);
        assert_eq!(workers[0].removed_at_ms, None);
        assert!(workers[1].removed_at_ms.is_some());
        // An enrolled id cannot be taken over; a removed one may enrol again.
        assert!(matches!(
            store.enrol("w1", &Fingerprint::of_der(b"other")),
            Err(StoreError::AlreadyEnrolled(_))
        ));
        assert_eq!(store.workers().unwrap()[0].cert_fingerprint, fp);
        store.enrol("w2", &fp).unwrap();
        assert_eq!(store.workers().unwrap()[1].removed_at_ms, None);
        assert!(store.is_enrolled("w2").unwrap());
        // Removing with rotation replaces the secret in the same step.
        let before = secret_hex(&store.join_secret().unwrap());
        let new = store.remove_rotating("w2", true).unwrap().unwrap();
        assert_eq!(secret_hex(&store.join_secret().unwrap()), secret_hex(&new));
        assert_ne!(before, secret_hex(&new));
        assert!(!store.is_enrolled("w2").unwrap());
    }
}
