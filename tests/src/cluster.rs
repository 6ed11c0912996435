//! A harness that runs real `ragd-coord` and `ragd-worker` processes for integration tests.
//!
//! Each [`TestCluster`] owns a temporary directory with the state directories and log files of
//! its processes, and kills every process it started when dropped. Binaries are looked up next
//! to the test executable's target directory; build them first with `cargo build --bins`.

use anyhow::{bail, Context, Result};
use ragd_worker::capabilities::LlmProbeConfig;
use ragd_worker::config::{MdnsSettings, WorkerConfig};
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary (`ragd-coord`, `ragd-worker`) built in the same target directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Tests run from target/debug/deps/<test>, bench binaries from target/debug/<bench>.
    let own = exe.parent().expect("target dir");
    let dir = if own.ends_with("deps") {
        own.parent().expect("target dir")
    } else {
        own
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// A free UDP port on 127.0.0.1 (free when asked; good enough for tests).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running process with its log file.
#[derive(Debug)]
pub struct Proc {
    /// The child process.
    pub child: Child,
    /// Its combined stdout/stderr log.
    pub log: PathBuf,
}

impl Proc {
    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A coordinator plus workers on this machine, each a separate process.
#[derive(Debug)]
pub struct TestCluster {
    /// Temporary root (state dirs and logs).
    pub root: tempfile::TempDir,
    /// Coordinator UDP port.
    pub coord_port: u16,
    /// The coordinator process, once started.
    pub coordinator: Option<Proc>,
    /// Extra environment for every process.
    pub env: Vec<(String, String)>,
}

impl TestCluster {
    /// A cluster in a fresh temporary directory.
    pub fn new() -> Result<Self> {
        Ok(Self {
            root: tempfile::tempdir()?,
            coord_port: free_udp_port(),
            coordinator: None,
            env: vec![(
                "RUST_LOG".into(),
                "info,ragd_coordinator=debug,ragd_worker=debug".into(),
            )],
        })
    }

    /// State directory of the coordinator.
    pub fn coord_dir(&self) -> PathBuf {
        self.root.path().join("coordinator")
    }

    /// State directory of a worker.
    pub fn worker_dir(&self, name: &str) -> PathBuf {
        self.root.path().join(format!("worker-{name}"))
    }

    /// The coordinator's address.
    pub fn coord_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.coord_port))
    }

    /// A `ragd-coord` command bound to this cluster's state directory.
    pub fn coord_cmd(&self) -> Command {
        let mut cmd = Command::new(binary("ragd-coord"));
        cmd.arg("--state-dir").arg(self.coord_dir());
        cmd.envs(self.env.iter().cloned());
        cmd
    }

    /// A `ragd-worker` command bound to a worker's state directory.
    pub fn worker_cmd(&self, name: &str) -> Command {
        let mut cmd = Command::new(binary("ragd-worker"));
        cmd.arg("--state-dir").arg(self.worker_dir(name));
        cmd.envs(self.env.iter().cloned());
        // No LLM server in tests unless a test starts a stand-in.
        cmd.env("RAGD_WORKER_LLM__OLLAMA_URL", "off");
        cmd
    }

    /// Runs `ragd-coord init` and returns the join token.
    pub fn init(&self) -> Result<String> {
        let out = run(self.coord_cmd().args(["init", "--id", "coord"]))?;
        token_from(&out)
    }

    /// Starts `ragd-coord serve` with the given extra arguments (peers, mDNS flags...).
    pub fn start_coordinator(&mut self, extra: &[String]) -> Result<()> {
        let mut cmd = self.coord_cmd();
        cmd.args(["serve", "--listen", &self.coord_addr().to_string()]);
        cmd.args(extra);
        let proc = spawn(cmd, &self.root.path().join("coordinator.log"))?;
        self.coordinator = Some(proc);
        self.wait_for(
            Duration::from_secs(20),
            "the coordinator's admin socket",
            |c| Ok(c.coord_dir().join("admin.sock").exists()),
        )
    }

    /// Starts the coordinator without mDNS, heartbeating every 300 ms, with a static peer on
    /// 127.0.0.1 for each of `ports`.
    pub fn start_coordinator_with_peers(&mut self, ports: &[u16]) -> Result<()> {
        let mut extra: Vec<String> = vec![
            "--no-mdns".into(),
            "--heartbeat-interval".into(),
            "300ms".into(),
        ];
        for p in ports {
            extra.push("--peer".into());
            extra.push(format!("127.0.0.1:{p}"));
        }
        self.start_coordinator(&extra)
    }

    /// The configuration of a worker run in the test's own process (`ragd_worker::server::run`)
    /// on 127.0.0.1:`port`, joining this cluster's coordinator: no mDNS, no Ollama probing.
    pub fn in_process_worker(&self, name: &str, port: u16) -> WorkerConfig {
        WorkerConfig {
            state_dir: Some(self.worker_dir(name)),
            listen: ([127, 0, 0, 1], port).into(),
            coordinator: Some(self.coord_addr().to_string()),
            name: Some(name.into()),
            mdns: MdnsSettings {
                enabled: false,
                ..Default::default()
            },
            llm: LlmProbeConfig {
                ollama_url: Some("off".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Runs `ragd-worker join` for a worker against the coordinator on loopback.
    pub fn join(&self, name: &str, token: &str) -> Result<Output> {
        let mut cmd = self.worker_cmd(name);
        cmd.args([
            "--no-mdns",
            "join",
            token,
            "--coordinator",
            &self.coord_addr().to_string(),
            "--name",
            name,
        ]);
        Ok(cmd.output()?)
    }

    /// Starts `ragd-worker run` listening on `port`.
    pub fn start_worker(&self, name: &str, port: u16, extra: &[String]) -> Result<Proc> {
        let mut cmd = self.worker_cmd(name);
        cmd.args(["run", "--listen", &format!("127.0.0.1:{port}")]);
        cmd.args(extra);
        spawn(cmd, &self.root.path().join(format!("worker-{name}.log")))
    }

    /// Joins workers `w1`, `w2`, ... (one per port of `ports`), starts each (`--no-mdns run`)
    /// with `env` added to its environment, and waits until every one is Ready.
    pub fn start_ready_workers(
        &self,
        token: &str,
        ports: &[u16],
        env: &[(&str, String)],
    ) -> Result<Vec<Proc>> {
        let mut workers = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let name = format!("w{}", i + 1);
            let out = self.join(&name, token)?;
            if !out.status.success() {
                bail!("join failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let mut cmd = self.worker_cmd(&name);
            cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
            cmd.args(["--no-mdns", "run", "--listen", &format!("127.0.0.1:{port}")]);
            workers.push(spawn(
                cmd,
                &self.root.path().join(format!("worker-{name}.log")),
            )?);
        }
        self.wait_for(Duration::from_secs(60), "every worker ready", |c| {
            let ready = c
                .workers()?
                .iter()
                .filter(|w| w["state"] == "Ready")
                .count();
            Ok(ready == ports.len())
        })?;
        Ok(workers)
    }

    /// `ragd-coord submit ARGS --json`; returns the job's id.
    pub fn submit(&self, args: &[&str]) -> Result<String> {
        let out = run(self.coord_cmd().arg("submit").args(args).arg("--json"))?;
        let v: Value =
            serde_json::from_str(out.trim()).with_context(|| format!("submit said {out:?}"))?;
        Ok(v["id"].as_str().context("no job id")?.to_string())
    }

    /// `ragd-coord workers --json`, parsed.
    pub fn workers(&self) -> Result<Vec<Value>> {
        let out = run(self.coord_cmd().args(["workers", "--json"]))?;
        let v: Value = serde_json::from_str(&out)
            .with_context(|| format!("workers --json printed {out:?}"))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// State of one worker ("Ready", "Unreachable", ...), if listed.
    pub fn state_of(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .workers()?
            .iter()
            .find(|w| w["id"] == id)
            .and_then(|w| w["state"].as_str().map(str::to_string)))
    }

    /// Polls `check` every 100 ms until it returns true, or fails after `timeout` with the
    /// coordinator's log attached.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        let mut last_err = None;
        while start.elapsed() < timeout {
            match check(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "timed out after {timeout:?} waiting for {what} (last error: {last_err:?})\n--- coordinator log (tail) ---\n{}",
            tail(&self.coordinator.as_ref().map(|c| c.log_text()).unwrap_or_default(), 60)
        )
    }
}

/// Spawns `cmd` with stdout and stderr appended to `log`.
pub fn spawn(mut cmd: Command, log: &Path) -> Result<Proc> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        .stdin(Stdio::null());
    let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    Ok(Proc {
        child,
        log: log.to_path_buf(),
    })
}

/// Runs `cmd` to completion; fails with its stderr unless it exits 0. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Extracts the join token from `ragd-coord init` / `token show` output.
pub fn token_from(output: &str) -> Result<String> {
    output
        .split_whitespace()
        .find(|w| w.starts_with("ragd1-"))
        .map(str::to_string)
        .with_context(|| format!("no join token in {output:?}"))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
