//! The cluster's state directory: `init` creates the CA, the coordinator's certificate and the
//! state database; the join token is read back from it (with or without the daemon).
//!
//! `init` is atomic: the identity is built in a temporary directory inside the state directory
//! and its files are renamed into place with `state.db` last, so `state.db` is the commit point.
//! Killed before that rename, the state directory holds no cluster and a rerun of `init` moves
//! any half-written identity aside and starts again; killed after it, the cluster is complete.
//! `init --force` renames the whole old state directory aside (printed) before writing the new.

use crate::admin;
use crate::config::CoordinatorConfig;
use crate::pki::CoordinatorPki;
use crate::store::{self, Store};
use crate::CoordError;
use ragd_shared::identity::{self, JoinSecret, JoinToken};
use std::path::{Path, PathBuf};

/// The files that make up a cluster's identity, in the order they are renamed into place:
/// `state.db` (join secret, enrolled workers) is last, so its presence means the rest is there.
const IDENTITY_FILES: [&str; 5] = [
    "ca.pem",
    "ca.key",
    "coordinator.pem",
    "coordinator.key",
    "state.db",
];

/// Prefix of the temporary directory an `init` builds the identity in.
const BUILD_PREFIX: &str = ".init-";

/// What `init` created.
#[derive(Debug)]
pub struct InitOutcome {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The coordinator's id.
    pub coordinator_id: String,
    /// The join token for workers.
    pub token: JoinToken,
    /// Where earlier state was moved (the old cluster with `--force`, or what an interrupted
    /// `init` left), if any was.
    pub moved_aside: Option<PathBuf>,
}

/// Creates the cluster CA, the coordinator's certificate and the state database.
pub fn init(
    cfg: &CoordinatorConfig,
    coordinator_id: &str,
    force: bool,
) -> Result<InitOutcome, CoordError> {
    identity::validate_node_id(coordinator_id)?;
    let dir = cfg.state_dir()?;
    let mut moved_aside = None;
    if dir.join("state.db").exists() {
        if !force {
            return Err(CoordError::AlreadyInitialised(dir));
        }
        if admin::daemon_listening(&dir) {
            return Err(CoordError::DaemonRunning(dir));
        }
        moved_aside = Some(move_state_dir_aside(&dir)?);
    }
    create_private_dir(&dir)?;
    remove_stale_builds(&dir)?;
    if let Some(aside) = move_partial_identity_aside(&dir)? {
        moved_aside.get_or_insert(aside);
    }
    let build = dir.join(format!("{BUILD_PREFIX}{}", std::process::id()));
    create_private_dir(&build)?;
    let token = build_identity(&build, coordinator_id)?;
    commit_identity(&build, &dir)?;
    tracing::info!(state_dir = %dir.display(), coordinator = coordinator_id, "cluster initialised");
    Ok(InitOutcome {
        state_dir: dir,
        coordinator_id: coordinator_id.to_string(),
        token,
        moved_aside,
    })
}

/// Writes the CA, the coordinator's credentials and a fresh state database into `build`.
fn build_identity(build: &Path, coordinator_id: &str) -> Result<JoinToken, CoordError> {
    let pki = CoordinatorPki::create(build, "ragd cluster", coordinator_id)?;
    let secret = JoinSecret::generate()?;
    {
        // Closed before the rename: the database is whole in `state.db` (no WAL left behind).
        let store = Store::open(build)?;
        store.initialise(coordinator_id, &secret)?;
    }
    Ok(JoinToken {
        ca_fingerprint: pki.ca_fingerprint(),
        secret,
    })
}

/// Renames the identity files from `build` into `dir` (`state.db` last) and removes `build`.
fn commit_identity(build: &Path, dir: &Path) -> Result<(), CoordError> {
    for name in IDENTITY_FILES {
        let (from, to) = (build.join(name), dir.join(name));
        std::fs::rename(&from, &to).map_err(io_error(&to))?;
    }
    sync_dir(dir)?;
    std::fs::remove_dir_all(build).map_err(io_error(build))
}

/// Renames the state directory to a new sibling `NAME.old-UNIXSECONDS[-N]` and returns it.
fn move_state_dir_aside(dir: &Path) -> Result<PathBuf, CoordError> {
    let aside = free_name(dir, "old")?;
    std::fs::rename(dir, &aside).map_err(|source| CoordError::MoveAside {
        from: dir.to_path_buf(),
        to: aside.clone(),
        source,
    })?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    tracing::warn!(from = %dir.display(), to = %aside.display(), "old cluster state moved aside");
    Ok(aside)
}

/// Moves identity files that an interrupted `init` left (there is no `state.db`, so they never
/// served a cluster) into `DIR/interrupted-init-UNIXSECONDS`, and returns that directory.
fn move_partial_identity_aside(dir: &Path) -> Result<Option<PathBuf>, CoordError> {
    let present: Vec<&str> = IDENTITY_FILES
        .iter()
        .copied()
        .filter(|name| dir.join(name).exists())
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let aside = free_name(&dir.join("interrupted-init"), "at")?;
    create_private_dir(&aside)?;
    for name in present {
        std::fs::rename(dir.join(name), aside.join(name)).map_err(io_error(&aside))?;
    }
    tracing::warn!(to = %aside.display(), "files of an interrupted init moved aside");
    Ok(Some(aside))
}

/// Removes `.init-PID` build directories whose process is gone (an interrupted `init`).
fn remove_stale_builds(dir: &Path) -> Result<(), CoordError> {
    let entries = std::fs::read_dir(dir).map_err(io_error(dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(BUILD_PREFIX)) else {
            continue;
        };
        let alive = pid.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
        });
        if alive {
            return Err(CoordError::InitInProgress(entry.path()));
        }
        std::fs::remove_dir_all(entry.path()).map_err(io_error(&entry.path()))?;
    }
    Ok(())
}

/// `BASE.TAG-UNIXSECONDS`, with `-N` appended until no such path exists.
fn free_name(base: &Path, tag: &str) -> Result<PathBuf, CoordError> {
    let secs = store::now_ms() / 1000;
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{tag}-{secs}"));
    let first = base.with_file_name(&name);
    if !first.exists() {
        return Ok(first);
    }
    (1..1000)
        .map(|n| {
            let mut candidate = name.clone();
            candidate.push(format!("-{n}"));
            base.with_file_name(candidate)
        })
        .find(|p| !p.exists())
        .ok_or_else(|| CoordError::Io {
            path: first,
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "no free name"),
        })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CoordError {
    let path = path.to_path_buf();
    move |source| CoordError::Io { path, source }
}

fn sync_dir(dir: &Path) -> Result<(), CoordError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

fn create_private_dir(dir: &Path) -> Result<(), CoordError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_error(dir))
}

/// The current join token, read from the state directory (works without the daemon).
pub fn current_token(cfg: &CoordinatorConfig) -> Result<JoinToken, CoordError> {
    let dir = cfg.state_dir()?;
    let store = open_initialised(&dir)?;
    let pki = CoordinatorPki::load(&dir)?;
    Ok(JoinToken {
        ca_fingerprint: pki.ca_fingerprint(),
        secret: store.join_secret()?,
    })
}

pub(crate) fn open_initialised(dir: &Path) -> Result<Store, CoordError> {
    if !dir.join("state.db").exists() {
        return Err(store::StoreError::NotInitialised(dir.to_path_buf()).into());
    }
    let store = Store::open(dir)?;
    store.coordinator_id()?;
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> CoordinatorConfig {
        CoordinatorConfig {
            state_dir: Some(dir.to_path_buf()),
            ..CoordinatorConfig::default()
        }
    }

    #[test]
    fn init_refuses_twice_and_force_moves_the_old_cluster_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let cfg = config(&dir);
        let first = init(&cfg, "coord", false).unwrap();
        assert!(first.moved_aside.is_none());
        std::fs::create_dir_all(dir.join("jobs/j1")).unwrap();
        assert!(matches!(
            init(&cfg, "coord", false),
            Err(CoordError::AlreadyInitialised(_))
        ));
        let second = init(&cfg, "coord", true).unwrap();
        let aside = second.moved_aside.expect("old state moved aside");
        assert!(aside.join("state.db").exists() && aside.join("jobs/j1").exists());
        assert!(!dir.join("jobs").exists());
        assert_ne!(first.token.to_string(), second.token.to_string());
        assert_eq!(
            current_token(&cfg).unwrap().to_string(),
            second.token.to_string()
        );
        let old = CoordinatorPki::load(&aside).unwrap();
        assert_eq!(old.ca_fingerprint(), first.token.ca_fingerprint);
    }

    #[test]
    fn a_rerun_recovers_from_an_interrupted_init_at_every_step() {
        // Replays the states a kill can leave: the build directory with some of the files, and
        // some of the files already renamed into place without `state.db`.
        for renamed in 0..IDENTITY_FILES.len() {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("state");
            create_private_dir(&dir).unwrap();
            let build = dir.join(format!("{BUILD_PREFIX}{}", u32::MAX));
            create_private_dir(&build).unwrap();
            build_identity(&build, "coord").unwrap();
            for name in &IDENTITY_FILES[..renamed] {
                std::fs::rename(build.join(name), dir.join(name)).unwrap();
            }
            std::fs::write(dir.join("notes.txt"), b"user file").unwrap();
            let cfg = config(&dir);
            assert!(
                current_token(&cfg).is_err(),
                "step {renamed}: no cluster yet"
            );
            let out = init(&cfg, "coord", false).unwrap();
            assert_eq!(out.moved_aside.is_some(), renamed > 0, "step {renamed}");
            assert!(!build.exists(), "the stale build directory is removed");
            assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"user file");
            assert_eq!(
                current_token(&cfg).unwrap().to_string(),
                out.token.to_string()
            );
            CoordinatorPki::load(&dir).unwrap();
        }
    }
}
