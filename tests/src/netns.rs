//! A simulated LAN built from Linux network namespaces (the recipe of `shared/tools/lan.sh`).
//!
//! [`SimLan::create`] makes `n` host namespaces, each with one veth named `eth0` plugged into a
//! bridge that lives in a namespace of its own; nothing is added to the default namespace. Host
//! `i` (0-based) gets `10.231.X.(i+1)/24`, with `X` chosen from the process id, plus its automatic
//! `fe80::` address (duplicate-address detection is off, so it is usable at once). Dropping the
//! [`SimLan`] kills every process left inside its namespaces and deletes them.
//!
//! Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN), `ip` (iproute2), `sysctl` (procps) and `kill`.

use anyhow::{bail, Context as _};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Most hosts one [`SimLan`] may have (keeps interface names within 15 characters).
pub const MAX_HOSTS: usize = 50;

/// What to tell the user when namespaces are impossible here.
const NEED: &str =
    "network namespace tests need root and iproute2: run as root / apt-get install iproute2";

/// Namespaces made by this harness are named `rg<pid hex>-<counter hex>-<sw|hN>`.
const NAME_START: &str = "rg";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A set of network namespaces joined by a bridge; see the module documentation.
#[derive(Debug)]
pub struct SimLan {
    prefix: String,
    hosts: usize,
    third_octet: u8,
}

impl SimLan {
    /// Builds a LAN of `n_hosts` hosts; fails with a message naming what is missing when
    /// namespaces cannot be created here.
    pub fn create(n_hosts: usize) -> anyhow::Result<SimLan> {
        if n_hosts == 0 || n_hosts > MAX_HOSTS {
            bail!("a simulated LAN has 1 to {MAX_HOSTS} hosts, not {n_hosts}");
        }
        check_prerequisites()?;
        let pid = std::process::id();
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        if counter > 0xff {
            // Names carry two hex digits of counter; reusing one could delete a live LAN.
            bail!("at most 256 simulated LANs per process; this test creates too many");
        }
        let prefix = format!("{NAME_START}{pid:x}-{counter:x}");
        // 10.231.1.0/24 to 10.231.250.0/24; namespaces are isolated anyway, this only keeps
        // concurrent runs' addresses apart in logs.
        let third_octet =
            u8::try_from((pid.wrapping_mul(7).wrapping_add(counter)) % 250 + 1).expect("below 251");
        clean_stale(&prefix);
        let lan = SimLan {
            prefix,
            hosts: n_hosts,
            third_octet,
        };
        // From here on, Drop removes whatever was created if a step fails.
        lan.build().with_context(|| {
            format!(
                "building the simulated LAN {} failed; if this persists: {NEED}",
                lan.prefix
            )
        })?;
        Ok(lan)
    }

    fn build(&self) -> anyhow::Result<()> {
        let sw = self.switch_namespace();
        new_namespace(&sw)?;
        // A pure layer-2 switch: no addresses of its own.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &sw,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &sw,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        run("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..self.hosts {
            let ns = self.namespace(i);
            new_namespace(&ns)?;
            let host_end = format!("{}a{i}", self.prefix);
            let switch_end = format!("{}p{i}", self.prefix);
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &host_end,
                    "netns",
                    &ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &switch_end,
                    "netns",
                    &sw,
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", &host_end, "name", "eth0"])?;
            let cidr = format!("{}/24", self.host_addr(i));
            run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "multicast", "on"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run(
                "ip",
                &["-n", &sw, "link", "set", &switch_end, "master", "br0"],
            )?;
            run("ip", &["-n", &sw, "link", "set", &switch_end, "up"])?;
        }
        tracing::debug!(prefix = %self.prefix, hosts = self.hosts, "simulated LAN up");
        Ok(())
    }

    /// Number of hosts.
    pub fn host_count(&self) -> usize {
        self.hosts
    }

    /// Name of host `i`'s namespace (0-based).
    pub fn namespace(&self, i: usize) -> String {
        assert!(i < self.hosts, "host {i} of a {}-host LAN", self.hosts);
        format!("{}-h{}", self.prefix, i + 1)
    }

    fn switch_namespace(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// The IPv4 address of host `i`'s `eth0` (0-based).
    pub fn host_addr(&self, i: usize) -> IpAddr {
        assert!(i < self.hosts, "host {i} of a {}-host LAN", self.hosts);
        let last = u8::try_from(i + 1).expect("MAX_HOSTS < 255");
        IpAddr::V4(Ipv4Addr::new(10, 231, self.third_octet, last))
    }

    /// The LAN's IPv4 network, `10.231.X.0`, and its prefix length (24).
    pub fn subnet(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 231, self.third_octet, 0), 24)
    }

    /// Whether `ip` is in this LAN's IPv4 subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4.octets()[..3] == [10, 231, self.third_octet],
            IpAddr::V6(_) => false,
        }
    }

    /// A command that runs `program` inside host `i` (`ip netns exec NS program`); add arguments
    /// with [`Command::arg`]. Its process id is that of `program` (`ip` execs it).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"])
            .arg(self.namespace(i))
            .arg(program);
        cmd
    }

    /// Runs `program args...` inside host `i`, waits, and returns its stdout; fails with its
    /// stderr on a non-zero exit.
    pub fn run(&self, i: usize, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(i, program)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {program} in {}", self.namespace(i)))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} in {} failed ({}): {}",
                self.namespace(i),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn all_namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = (0..self.hosts).map(|i| self.namespace(i)).collect();
        all.push(self.switch_namespace());
        all
    }
}

impl Drop for SimLan {
    fn drop(&mut self) {
        let existing = list_namespaces();
        for ns in self.all_namespaces() {
            // A failed build may have stopped before creating some of them.
            if existing.contains(&ns) {
                delete_namespace(&ns);
            }
        }
        tracing::debug!(prefix = %self.prefix, "simulated LAN removed");
    }
}

fn check_prerequisites() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_string);
    match euid.as_deref() {
        Some("0") => {}
        Some(uid) => bail!("{NEED} (this process runs as uid {uid}, not root)"),
        None => bail!("{NEED} (cannot read the effective uid from /proc/self/status)"),
    }
    for (tool, package) in [("ip", "iproute2"), ("sysctl", "procps"), ("kill", "procps")] {
        let found = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            bail!("{NEED} (`{tool}` not found: apt-get install {package})");
        }
    }
    Ok(())
}

/// Runs a tool in the default namespace (only ever `ip ... netns`/`-n` commands that act inside
/// this harness's namespaces) and fails with its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}: {NEED}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn new_namespace(ns: &str) -> anyhow::Result<()> {
    run("ip", &["netns", "add", ns])?;
    run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    // Skip IPv6 duplicate-address detection so fe80:: addresses are usable at once.
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )
}

fn list_namespaces() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn namespace_pids(ns: &str) -> Vec<String> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Kills what still runs inside `ns` (a namespace with live processes outlives `ip netns del`),
/// then deletes it. Best effort; bounded.
fn delete_namespace(ns: &str) {
    for signal in ["-TERM", "-KILL"] {
        let pids = namespace_pids(ns);
        if pids.is_empty() {
            break;
        }
        let _ = Command::new("kill")
            .arg(signal)
            .args(&pids)
            .stderr(Stdio::null())
            .status();
        for _ in 0..20 {
            if namespace_pids(ns).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if let Err(e) = run("ip", &["netns", "del", ns]) {
        tracing::warn!(namespace = ns, error = %e, "cannot delete test namespace");
    }
}

/// Deletes leftovers of earlier runs: namespaces of this `prefix` (a reused pid), and namespaces
/// of this harness whose creating process no longer exists.
fn clean_stale(prefix: &str) {
    let own = format!("{prefix}-");
    for ns in list_namespaces() {
        let stale = ns.starts_with(&own) || harness_owner(&ns).is_some_and(|pid| !pid_alive(pid));
        if stale {
            tracing::info!(namespace = %ns, "removing a stale test namespace");
            delete_namespace(&ns);
        }
    }
}

/// The creating pid of a namespace named by this harness (`rg<pid hex>-<hex>-<sw|hN>`).
fn harness_owner(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix(NAME_START)?;
    let mut parts = rest.splitn(3, '-');
    let pid = u32::from_str_radix(parts.next()?, 16).ok()?;
    u32::from_str_radix(parts.next()?, 16).ok()?;
    let role = parts.next()?;
    let host = role.strip_prefix('h').map(|n| n.parse::<u32>().is_ok());
    (role == "sw" || host == Some(true)).then_some(pid)
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_namespace_links() -> String {
        let out = Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip -o link");
        // Drop the counters-free part only: names and flags, one per line.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Needs root like every namespace test: fails with the harness's explanation otherwise.
    #[test]
    fn lan_is_addressed_leaves_the_default_namespace_alone_and_cleans_up() {
        let before = default_namespace_links();
        let lan = SimLan::create(2).unwrap_or_else(|e| panic!("{e:#}"));
        let names: Vec<String> = lan.all_namespaces();
        let listed = list_namespaces();
        assert!(
            names.iter().all(|n| listed.contains(n)),
            "{names:?} not in {listed:?}"
        );
        for i in 0..2 {
            let addrs = lan
                .run(i, "ip", &["-o", "addr", "show", "dev", "eth0"])
                .unwrap();
            assert!(
                addrs.contains(&format!("{}/24", lan.host_addr(i))),
                "{addrs}"
            );
            assert!(lan.contains(lan.host_addr(i)));
            let lo = lan.run(i, "ip", &["-o", "link", "show", "lo"]).unwrap();
            assert!(lo.contains("UP"), "loopback must be up: {lo}");
        }
        assert_eq!(
            default_namespace_links(),
            before,
            "default namespace links changed"
        );
        let mut sleeper = lan.command(0, "sleep").arg("30").spawn().unwrap();
        drop(lan);
        let listed = list_namespaces();
        assert!(
            names.iter().all(|n| !listed.contains(n)),
            "left behind: {listed:?}"
        );
        let mut exited = None;
        for _ in 0..50 {
            exited = sleeper.try_wait().unwrap();
            if exited.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = exited.expect("the process inside the namespace must be killed on drop");
        assert!(
            !status.success(),
            "sleep 30 cannot have finished normally: {status}"
        );
        assert_eq!(
            default_namespace_links(),
            before,
            "default namespace links changed"
        );
    }

    #[test]
    fn harness_names_are_recognised_and_short() {
        assert_eq!(harness_owner("rg3039-0-sw"), Some(0x3039));
        assert_eq!(harness_owner("rg3039-1f-h12"), Some(0x3039));
        assert_eq!(harness_owner("rg3039-1f-hx"), None);
        assert_eq!(harness_owner("rgx-1-sw"), None);
        assert_eq!(harness_owner("other-ns"), None);
        // Longest interface name: pid up to 2^22 (6 hex digits), counter 2 hex digits, host 49.
        let prefix = format!("{NAME_START}{:x}-{:x}", 4_194_304u32, 0xffu32);
        assert!(format!("{prefix}a{}", MAX_HOSTS - 1).len() <= 15);
        assert!(format!("{prefix}p{}", MAX_HOSTS - 1).len() <= 15);
    }
}
