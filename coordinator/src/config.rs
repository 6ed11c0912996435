//! Coordinator configuration: defaults, then a TOML file, then `RAGD_COORD_*` environment
//! variables, then command-line flags; validated once by [`CoordinatorConfig::load`].

use ragd_shared::daemon::load_layered;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use ragd_shared::daemon::ConfigError;
pub use ragd_shared::discovery::MdnsSettings;

/// The coordinator's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Where the cluster CA, keys and the state database live. Default: the platform data dir.
    pub state_dir: Option<PathBuf>,
    /// UDP address the coordinator listens on (enrolment).
    pub listen: SocketAddr,
    /// Workers to dial directly (`host:port`), for networks without multicast.
    pub peers: Vec<String>,
    /// mDNS discovery.
    pub mdns: MdnsSettings,
    /// How often each worker is sent a heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Consecutive missed heartbeats after which a worker is Unreachable.
    pub heartbeat_misses: u32,
    /// First delay before redialling an unreachable worker (doubles, with jitter).
    #[serde(with = "humantime_serde")]
    pub reconnect_initial: Duration,
    /// Longest delay between redials.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Networks accepted besides the LAN ranges (loopback, RFC 1918, fc00::/7, link-local, 100.64/10).
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// Accept peers from any address (turns the LAN-only guard off).
    pub allow_public_peers: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            state_dir: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 7700)),
            peers: Vec::new(),
            mdns: MdnsSettings::default(),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_misses: 3,
            reconnect_initial: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            allowed_networks: Vec::new(),
            allow_public_peers: false,
        }
    }
}

impl CoordinatorConfig {
    /// Loads defaults, then `file` (if given), then `RAGD_COORD_*` environment variables (nested
    /// keys with `__`, e.g. `RAGD_COORD_MDNS__ENABLED=false`), then `overrides` (the CLI flags),
    /// and validates the result.
    pub fn load(file: Option<&Path>, overrides: CliOverrides) -> Result<Self, ConfigError> {
        let mut cfg: CoordinatorConfig =
            load_layered(CoordinatorConfig::default(), file, "RAGD_COORD_")?;
        overrides.apply(&mut cfg);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval < Duration::from_millis(50) {
            return Err(ConfigError::Invalid {
                key: "heartbeat_interval",
                problem: format!(
                    "{:?} is too short; use at least 50ms",
                    self.heartbeat_interval
                ),
            });
        }
        if self.heartbeat_misses == 0 {
            return Err(ConfigError::Invalid {
                key: "heartbeat_misses",
                problem: "must be at least 1".into(),
            });
        }
        if self.reconnect_initial.is_zero() || self.reconnect_max < self.reconnect_initial {
            return Err(ConfigError::Invalid {
                key: "reconnect_max",
                problem: "reconnect_initial must be > 0 and reconnect_max >= reconnect_initial"
                    .into(),
            });
        }
        for peer in &self.peers {
            if peer
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(ConfigError::Invalid {
                    key: "peers",
                    problem: format!("{peer:?} is not HOST:PORT (for example 192.168.1.20:7701)"),
                });
            }
        }
        Ok(())
    }

    /// The state directory: the configured one or the platform's data directory.
    pub fn state_dir(&self) -> Result<PathBuf, ConfigError> {
        match &self.state_dir {
            Some(dir) => Ok(dir.clone()),
            None => directories::ProjectDirs::from("", "", "ragd")
                .map(|d| d.data_dir().join("coordinator"))
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

    /// How long a dead worker may take to be marked Unreachable.
    pub fn unreachable_bound(&self) -> Duration {
        self.heartbeat_interval * (self.heartbeat_misses + 1)
    }
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct CliOverrides {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--peer` (repeatable; replaces the configured list when given).
    pub peers: Vec<String>,
    /// `--no-mdns`.
    pub no_mdns: bool,
    /// `--mdns-port`.
    pub mdns_port: Option<u16>,
    /// `--heartbeat-interval`.
    pub heartbeat_interval: Option<Duration>,
}

impl CliOverrides {
    fn apply(self, cfg: &mut CoordinatorConfig) {
        if let Some(v) = self.state_dir {
            cfg.state_dir = Some(v);
        }
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if !self.peers.is_empty() {
            cfg.peers = self.peers;
        }
        if self.no_mdns {
            cfg.mdns.enabled = false;
        }
        if let Some(v) = self.mdns_port {
            cfg.mdns.port = v;
        }
        if let Some(v) = self.heartbeat_interval {
            cfg.heartbeat_interval = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coord.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nheartbeat_interval = \"5s\"\npeers = [\"10.0.0.2:7701\"]\n[mdns]\nenabled = false\n",
        )
        .unwrap();
        let cfg = CoordinatorConfig::load(
            Some(&file),
            CliOverrides {
                heartbeat_interval: Some(Duration::from_secs(1)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(cfg.peers, vec!["10.0.0.2:7701".to_string()]);
        assert!(!cfg.mdns.enabled);
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coord.toml");
        std::fs::write(&file, "peers = [\"nohost\"]\n").unwrap();
        let err = CoordinatorConfig::load(Some(&file), CliOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("`peers`"), "{err}");
        std::fs::write(&file, "heartbeat_misses = \"many\"\n").unwrap();
        let err = CoordinatorConfig::load(Some(&file), CliOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("heartbeat_misses"), "{err}");
        std::fs::write(&file, "no_such_key = 1\n").unwrap();
        let err = CoordinatorConfig::load(Some(&file), CliOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }
}
