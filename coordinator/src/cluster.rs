//! The cluster's state directory: `init` creates the CA, the coordinator's certificate and the
//! state database; the join token is read back from it (with or without the daemon).

use crate::config::CoordinatorConfig;
use crate::pki::CoordinatorPki;
use crate::store::{self, Store};
use crate::CoordError;
use ragd_shared::identity::{self, JoinSecret, JoinToken};
use std::path::{Path, PathBuf};

/// What `init` created.
#[derive(Debug)]
pub struct InitOutcome {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The coordinator's id.
    pub coordinator_id: String,
    /// The join token for workers.
    pub token: JoinToken,
}

/// Creates the cluster CA, the coordinator's certificate and the state database.
pub fn init(
    cfg: &CoordinatorConfig,
    coordinator_id: &str,
    force: bool,
) -> Result<InitOutcome, CoordError> {
    identity::validate_node_id(coordinator_id)?;
    let dir = cfg.state_dir()?;
    if dir.join("state.db").exists() && !force {
        return Err(CoordError::AlreadyInitialised(dir));
    }
    create_private_dir(&dir)?;
    if force {
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    let pki = CoordinatorPki::create(&dir, "ragd cluster", coordinator_id)?;
    let store = Store::open(&dir)?;
    let secret = JoinSecret::generate()?;
    store.initialise(coordinator_id, &secret)?;
    tracing::info!(state_dir = %dir.display(), coordinator = coordinator_id, "cluster initialised");
    Ok(InitOutcome {
        state_dir: dir,
        coordinator_id: coordinator_id.to_string(),
        token: JoinToken {
            ca_fingerprint: pki.ca_fingerprint(),
            secret,
        },
    })
}

fn create_private_dir(dir: &Path) -> Result<(), CoordError> {
    let io = |source| CoordError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
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
