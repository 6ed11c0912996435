//! Runs a Python reference benchmark script (`scripts/NAME`) and reads the JSON line it prints
//! last. Shared by the benchmark examples through `#[path]`.

use std::path::Path;

use anyhow::Context as _;

/// Runs `PYTHON scripts/SCRIPT ARGS` offline (HF_HUB_OFFLINE=1) with the thread count of this
/// process and returns its last stdout line as JSON.
pub fn run_reference(
    python: &str,
    script: &str,
    args: &[&dyn AsRef<std::ffi::OsStr>],
) -> anyhow::Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(script);
    let output = std::process::Command::new(python)
        .arg(&script)
        .args(args.iter().map(|a| a.as_ref()))
        .args([
            "--threads",
            &candle_core::utils::get_num_threads().to_string(),
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    if !output.status.success() {
        anyhow::bail!(
            "reference script failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().context("reference printed nothing")?;
    Ok(serde_json::from_str(line)?)
}
