//! What both binaries do the same way around their daemons: wait for the shutdown signal, set
//! up the tracing subscriber (the binaries call it; libraries only emit events), and load a
//! layered configuration (defaults -> TOML file -> `RAGD_*` environment -> the caller's flags).

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors loading or validating a daemon's configuration (both binaries' `config` modules use
/// this one type). Each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` (or `RAGD_*_CONFIG`) does not exist.
    #[error("config file {path} does not exist: check the path given with --config")]
    MissingFile {
        /// The path given.
        path: String,
    },
    /// The file, environment or flags could not be parsed into the configuration.
    #[error("invalid configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value parsed but is not acceptable.
    #[error("invalid configuration value for `{key}`: {problem}")]
    Invalid {
        /// The config key (as written in the TOML file).
        key: &'static str,
        /// What is wrong and what to do.
        problem: String,
    },
    /// No state directory could be determined.
    #[error("cannot determine a state directory (no home directory?): set `state_dir` or pass --state-dir")]
    NoStateDir,
}

/// Loads `defaults`, then `file` (TOML), then the environment variables that start with
/// `env_prefix` (nested keys with `__`, e.g. `RAGD_WORKER_MDNS__ENABLED=false`). The variable
/// `{env_prefix}CONFIG` names the file (the binaries read it as their `--config` flag) and is
/// not a key. Flags are the caller's to apply on the result, and validation its own.
pub fn load_layered<T: Serialize + DeserializeOwned>(
    defaults: T,
    file: Option<&Path>,
    env_prefix: &str,
) -> Result<T, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(defaults));
    if let Some(file) = file {
        if !file.exists() {
            return Err(ConfigError::MissingFile {
                path: file.display().to_string(),
            });
        }
        fig = fig.merge(Toml::file(file));
    }
    fig = fig.merge(Env::prefixed(env_prefix).ignore(&["config"]).split("__"));
    fig.extract().map_err(|e| ConfigError::Parse(Box::new(e)))
}

/// Resolves when the process gets SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Installs the process's tracing subscriber on stderr: `RUST_LOG` if set, else `filter`;
/// JSON lines when `json`.
pub fn init_tracing(filter: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        name: String,
        port: u16,
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail returns its own error type
    fn layers_apply_in_order_and_the_config_variable_is_not_a_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "name = \"file\"\nport = 1")?;
            jail.set_env("RAGD_SAMPLE_PORT", "7");
            jail.set_env("RAGD_SAMPLE_CONFIG", "c.toml");
            let got = load_layered(Sample::default(), Some(Path::new("c.toml")), "RAGD_SAMPLE_")
                .map_err(|e| e.to_string())?;
            assert_eq!(
                got,
                Sample {
                    name: "file".into(),
                    port: 7
                }
            );
            let missing = load_layered(
                Sample::default(),
                Some(Path::new("nope.toml")),
                "RAGD_SAMPLE_",
            );
            assert!(matches!(missing, Err(ConfigError::MissingFile { .. })));
            Ok(())
        });
    }
}
