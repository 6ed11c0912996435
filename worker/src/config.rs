//! Worker configuration: defaults, then a TOML file, then `RAGD_WORKER_*` environment variables,
//! then command-line flags; validated once by [`WorkerConfig::load`].

use crate::capabilities::{CapabilityOverrides, LlmProbeConfig};
use ragd_shared::daemon::load_layered;
use ragd_shared::protocol::{VersionRange, SUPPORTED_VERSIONS};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use ragd_shared::daemon::ConfigError;
pub use ragd_shared::discovery::MdnsSettings;

/// The worker's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Where the worker's key, certificate and identity live. Default: the platform data dir.
    pub state_dir: Option<PathBuf>,
    /// UDP address the worker listens on for its coordinator.
    pub listen: SocketAddr,
    /// The coordinator's `host:port` for enrolment when mDNS is not available.
    pub coordinator: Option<String>,
    /// A join token: when set and the worker has not joined yet, `run` joins first.
    pub join_token: Option<String>,
    /// The id to enrol under (default: the host name).
    pub name: Option<String>,
    /// mDNS discovery.
    pub mdns: MdnsSettings,
    /// Networks accepted besides the LAN ranges (loopback, RFC 1918, fc00::/7, link-local, 100.64/10).
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// Accept peers from any address (turns the LAN-only guard off).
    pub allow_public_peers: bool,
    /// Overrides of detected capabilities (force CPU, hide GPUs, cap cores or memory, slots).
    pub capabilities: CapabilityOverrides,
    /// Local LLM endpoints to report (Ollama, OpenAI-compatible servers).
    pub llm: LlmProbeConfig,
    /// How often LLM endpoints and memory are re-detected.
    #[serde(with = "humantime_serde")]
    pub capability_refresh: Duration,
    /// The protocol versions the worker speaks: always this build's own range, except in tests
    /// that run an older worker's protocol beside a newer coordinator (not configurable).
    #[serde(skip, default = "own_protocol_versions")]
    pub protocol_versions: VersionRange,
}

fn own_protocol_versions() -> VersionRange {
    SUPPORTED_VERSIONS
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            state_dir: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 7701)),
            coordinator: None,
            join_token: None,
            name: None,
            mdns: MdnsSettings::default(),
            allowed_networks: Vec::new(),
            allow_public_peers: false,
            capabilities: CapabilityOverrides::default(),
            llm: LlmProbeConfig::default(),
            capability_refresh: Duration::from_secs(30),
            protocol_versions: SUPPORTED_VERSIONS,
        }
    }
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct CliOverrides {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--coordinator`.
    pub coordinator: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `--no-mdns`.
    pub no_mdns: bool,
    /// `--mdns-port`.
    pub mdns_port: Option<u16>,
    /// `--force-cpu`.
    pub force_cpu: bool,
}

impl WorkerConfig {
    /// Loads defaults, then `file`, then `RAGD_WORKER_*` environment variables (nested keys with
    /// `__`, e.g. `RAGD_WORKER_MDNS__ENABLED=false`), then `overrides`, and validates the result.
    pub fn load(file: Option<&Path>, overrides: CliOverrides) -> Result<Self, ConfigError> {
        let mut cfg: WorkerConfig = load_layered(WorkerConfig::default(), file, "RAGD_WORKER_")?;
        if let Some(v) = overrides.state_dir {
            cfg.state_dir = Some(v);
        }
        if let Some(v) = overrides.listen {
            cfg.listen = v;
        }
        if let Some(v) = overrides.coordinator {
            cfg.coordinator = Some(v);
        }
        if let Some(v) = overrides.name {
            cfg.name = Some(v);
        }
        if overrides.no_mdns {
            cfg.mdns.enabled = false;
        }
        if let Some(v) = overrides.mdns_port {
            cfg.mdns.port = v;
        }
        if overrides.force_cpu {
            cfg.capabilities.force_cpu = true;
        }
        // LLM endpoints are held to the same networks as peers.
        cfg.llm.guard = cfg.lan_guard();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(c) = &self.coordinator {
            if c.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(ConfigError::Invalid {
                    key: "coordinator",
                    problem: format!("{c:?} is not HOST:PORT (for example 192.168.1.10:7700)"),
                });
            }
        }
        if let Some(name) = &self.name {
            ragd_shared::identity::validate_node_id(name).map_err(|e| ConfigError::Invalid {
                key: "name",
                problem: e.to_string(),
            })?;
        }
        if self.capability_refresh < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "capability_refresh",
                problem: "must be at least 1s".into(),
            });
        }
        Ok(())
    }

    /// The state directory: the configured one or the platform's data directory.
    pub fn state_dir(&self) -> Result<PathBuf, ConfigError> {
        match &self.state_dir {
            Some(dir) => Ok(dir.clone()),
            None => directories::ProjectDirs::from("", "", "ragd")
                .map(|d| d.data_dir().join("worker"))
                .ok_or(ConfigError::NoStateDir),
        }
    }

    /// The LAN-only guard this config asks for.
    pub fn lan_guard(&self) -> ragd_shared::netguard::LanGuard {
        ragd_shared::netguard::LanGuard {
            extra_allowed: self.allowed_networks.clone(),
            allow_any: self.allow_public_peers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9100\"\nname = \"desk\"\n[mdns]\nenabled = false\n",
        )
        .unwrap();
        let cfg = WorkerConfig::load(
            Some(&file),
            CliOverrides {
                name: Some("laptop".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(cfg.name.as_deref(), Some("laptop"));
        assert!(!cfg.mdns.enabled);

        std::fs::write(&file, "coordinator = \"nohost\"\n").unwrap();
        let err = WorkerConfig::load(Some(&file), CliOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("`coordinator`"), "{err}");
        std::fs::write(&file, "name = \"Bad Name!\"\n").unwrap();
        let err = WorkerConfig::load(Some(&file), CliOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("`name`"), "{err}");
    }
}
