//! The coordinator's keys and certificates on disk: the cluster CA and the coordinator's own
//! credentials, all in the state directory (keys 0600, directory 0700).

use ragd_shared::identity::{ClusterCa, Fingerprint, IdentityError, NodeCredentials};
use std::path::Path;

/// File stem of the coordinator's own certificate and key.
const COORDINATOR_STEM: &str = "coordinator";

/// The cluster CA and the coordinator's credentials.
pub struct CoordinatorPki {
    /// The cluster CA (signs worker certificates).
    pub ca: ClusterCa,
    /// The coordinator's certificate and key.
    pub credentials: NodeCredentials,
}

impl CoordinatorPki {
    /// Creates a new CA and coordinator certificate and writes them to `dir`.
    pub fn create(
        dir: &Path,
        cluster_name: &str,
        coordinator_id: &str,
    ) -> Result<Self, IdentityError> {
        let ca = ClusterCa::generate(cluster_name)?;
        let credentials = ca.issue_coordinator(coordinator_id)?;
        ca.save(dir)?;
        credentials.save(dir, COORDINATOR_STEM)?;
        Ok(Self { ca, credentials })
    }

    /// Loads the CA and credentials from `dir`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        Ok(Self {
            ca: ClusterCa::load(dir)?,
            credentials: NodeCredentials::load(dir, COORDINATOR_STEM)?,
        })
    }

    /// Fingerprint of the cluster CA (what join tokens pin).
    pub fn ca_fingerprint(&self) -> Fingerprint {
        self.ca.fingerprint()
    }
}
