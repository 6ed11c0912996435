//! `RAGD_COORD_CONFIG` / `RAGD_WORKER_CONFIG` name the configuration file (as `--config` does)
//! and are not read as a configuration key.

use anyhow::{ensure, Result};
use ragd_tests::cluster::{binary, run};
use std::process::Command;

#[test]
fn coordinator_reads_the_file_named_by_its_config_variable() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("from-file");
    let file = tmp.path().join("coordinator.toml");
    std::fs::write(
        &file,
        format!("state_dir = {:?}\n", state.display().to_string()),
    )?;
    let out = run(Command::new(binary("ragd-coord"))
        .arg("init")
        .env("RAGD_COORD_CONFIG", &file)
        .env_remove("RAGD_COORD_STATE_DIR"))?;
    ensure!(out.contains("ragd1-"), "init printed no token: {out}");
    ensure!(
        state.join("state.db").is_file(),
        "the state directory set in the file was not used"
    );
    Ok(())
}

#[test]
fn worker_reads_the_file_named_by_its_config_variable() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("worker.toml");
    std::fs::write(
        &file,
        "[llm]\nollama_url = \"off\"\n\n[mdns]\nenabled = false\n",
    )?;
    let out = run(Command::new(binary("ragd-worker"))
        .args(["--state-dir"])
        .arg(tmp.path().join("state"))
        .args(["info", "--json"])
        .env("RAGD_WORKER_CONFIG", &file))?;
    let caps: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(caps.is_object(), "info --json printed {out}");
    // The file is really read: a bad value in it is refused, naming the key.
    std::fs::write(&file, "listen = \"not an address\"\n")?;
    let bad = Command::new(binary("ragd-worker"))
        .args(["info", "--json"])
        .env("RAGD_WORKER_CONFIG", &file)
        .output()?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        !bad.status.success() && stderr.contains("listen"),
        "a bad value in the file named by RAGD_WORKER_CONFIG was not refused: {stderr}"
    );
    Ok(())
}
