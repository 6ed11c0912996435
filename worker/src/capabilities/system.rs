//! OS, CPU and memory detection (sysinfo), live load sampling and human size parsing.

use ragd_engine::device::system_memory;
use sysinfo::{CpuRefreshKind, System};

use super::{CapabilityError, Load};

/// What the machine itself offers, before overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SystemInfo {
    /// OS name and version.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Host name.
    pub hostname: String,
    /// CPU model name.
    pub cpu_model: String,
    /// Logical cores this process may run on.
    pub logical_cores: u32,
    /// Total RAM in bytes (bounded by a cgroup limit where one applies).
    pub total_memory_bytes: u64,
    /// Available RAM in bytes.
    pub available_memory_bytes: u64,
}

/// Reads OS, CPU and memory facts. Blocking (it reads /proc or calls the OS): run it off the runtime.
pub(crate) fn detect_system() -> SystemInfo {
    let mut sys = System::new();
    sys.refresh_cpu_list(CpuRefreshKind::nothing());

    let os = os_description();
    // Rust's spelling ("x86_64", "aarch64") is the same on every OS, unlike `uname -m` ("arm64").
    let arch = std::env::consts::ARCH.to_string();
    let hostname = System::host_name()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    let cpu_model = sys
        .cpus()
        .iter()
        .map(|c| c.brand().trim())
        .find(|b| !b.is_empty())
        .unwrap_or("unknown")
        .to_string();

    // sysinfo lists every CPU of the machine; affinity masks and cgroup quotas can allow fewer.
    let listed = u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX);
    let allowed = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let logical_cores = match listed {
        0 => allowed,
        n => n.min(allowed),
    }
    .max(1);

    let (total, available) = system_memory();
    let info = SystemInfo {
        os,
        arch,
        hostname,
        cpu_model,
        logical_cores,
        total_memory_bytes: total,
        available_memory_bytes: available,
    };
    tracing::debug!(?info, "system detected");
    info
}

/// OS name and version, e.g. "Debian GNU/Linux 12" or "macOS 15.1.1 Sequoia".
fn os_description() -> String {
    if cfg!(target_os = "macos") || cfg!(target_os = "windows") {
        if let Some(long) = System::long_os_version().filter(|s| !s.is_empty()) {
            return long;
        }
    }
    let name = System::name()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    match System::os_version().filter(|s| !s.is_empty()) {
        Some(version) if !name.contains(&version) => format!("{name} {version}"),
        _ => name,
    }
}

/// The worker's load now: the given slot counts and freshly read available memory.
pub fn sample_load(busy_slots: u32, total_slots: u32) -> Load {
    let (_, available) = system_memory();
    Load {
        busy_slots,
        total_slots,
        available_memory_bytes: available,
    }
}

/// Parses a human size such as "8GiB", "512 MiB", "1.5GB" or "1024" (bytes) into bytes.
///
/// Units (case-insensitive): B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024).
/// `key` names the configuration key in the error.
pub fn parse_size(key: &'static str, text: &str) -> Result<u64, CapabilityError> {
    let err = |reason: &str| CapabilityError::InvalidSize {
        key,
        value: text.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() {
        return Err(err("no number"));
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(err(&format!("unknown unit {:?}", unit.trim()))),
    };
    let too_big = || err("larger than 2^64 bytes");
    match number.split_once('.') {
        None => {
            let whole: u64 = number.parse().map_err(|_| too_big())?;
            whole.checked_mul(multiplier).ok_or_else(too_big)
        }
        Some((whole, fraction)) => {
            if whole.is_empty() || fraction.is_empty() || fraction.contains('.') {
                return Err(err("malformed decimal number"));
            }
            let whole: u64 = whole.parse().map_err(|_| too_big())?;
            // Exact integer arithmetic on up to 9 fractional digits; further digits are dropped.
            let digits = &fraction[..fraction.len().min(9)];
            let scale = 10u128.pow(u32::try_from(digits.len()).unwrap_or(9));
            let frac: u128 = digits
                .parse()
                .map_err(|_| err("malformed decimal number"))?;
            let bytes =
                u128::from(whole) * u128::from(multiplier) + frac * u128::from(multiplier) / scale;
            u64::try_from(bytes).map_err(|_| too_big())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_every_unit() {
        let cases = [
            ("1024", 1024),
            ("0B", 0),
            ("7 B", 7),
            ("8GiB", 8 << 30),
            ("8 GiB", 8 << 30),
            ("8gib", 8 << 30),
            ("512MiB", 512 << 20),
            ("3KiB", 3 << 10),
            ("2TiB", 2 << 40),
            ("3KB", 3_000),
            ("5MB", 5_000_000),
            ("16GB", 16_000_000_000),
            ("1TB", 1_000_000_000_000),
            ("1.5GiB", 3 << 29),
            ("0.5KB", 500),
            ("  4 MiB  ", 4 << 20),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size("max_memory", text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn rejects_bad_sizes_naming_key_and_value() {
        for text in [
            "",
            "GiB",
            "8XB",
            "8 G",
            "-1GiB",
            "1..5GiB",
            ".5GiB",
            "5.GiB",
            "8GiB extra",
        ] {
            let e = parse_size("max_memory", text).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(&e, CapabilityError::InvalidSize { key: "max_memory", value, .. } if value == text),
                "{text}: {e:?}"
            );
            assert!(msg.contains("max_memory") && msg.contains("8GiB"), "{msg}");
        }
        let overflow = parse_size("max_memory", "99999999999TiB").unwrap_err();
        assert!(overflow.to_string().contains("2^64"), "{overflow}");
    }

    #[test]
    fn detects_sane_values_on_this_machine() {
        let info = detect_system();
        assert!(info.logical_cores >= 1);
        assert!(info.total_memory_bytes > 0);
        assert!(info.available_memory_bytes <= info.total_memory_bytes);
        assert!(!info.os.is_empty() && !info.arch.is_empty() && !info.hostname.is_empty());
        assert_eq!(info.arch, std::env::consts::ARCH);
    }

    #[test]
    fn samples_load_with_fresh_memory() {
        let load = sample_load(1, 3);
        assert_eq!((load.busy_slots, load.total_slots), (1, 3));
        assert!(load.available_memory_bytes > 0);
    }
}
