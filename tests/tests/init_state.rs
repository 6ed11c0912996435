//! `ragd-coord init` through the CLI: killed at any moment, a rerun succeeds (or the directory
//! already holds a whole cluster); `init --force` moves the old state aside and never leaves a
//! directory that neither `token show` nor `init` accepts.

use anyhow::{ensure, Context, Result};
use ragd_tests::cluster::{binary, run};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn coord(state: &Path) -> Command {
    let mut cmd = Command::new(binary("ragd-coord"));
    cmd.arg("--state-dir")
        .arg(state)
        .env_remove("RAGD_COORD_CONFIG");
    cmd
}

fn token_of(out: &str) -> Option<String> {
    out.split_whitespace()
        .find(|w| w.starts_with("ragd1-"))
        .map(str::to_string)
}

#[test]
fn init_killed_at_any_moment_is_recovered_by_a_rerun() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Kill delays spread over the whole run of `init` (it takes tens of milliseconds), in a fixed
    // order so a failure names its delay.
    for (round, delay_ms) in [0u64, 2, 5, 8, 12, 16, 20, 25, 30, 40, 60, 90]
        .into_iter()
        .enumerate()
    {
        let state = tmp.path().join(format!("state-{round}"));
        for force in [false, true] {
            let mut cmd = coord(&state);
            cmd.arg("init").args(force.then_some("--force"));
            let mut child = cmd
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            std::thread::sleep(Duration::from_millis(delay_ms));
            let _ = child.kill();
            child.wait()?;
            // Whatever the kill left, `init --force` (or `init`, when there is no cluster yet)
            // succeeds and `token show` then prints the token it printed.
            let has_cluster = state.join("state.db").exists();
            let mut rerun = coord(&state);
            rerun.arg("init").args(has_cluster.then_some("--force"));
            let out = run(&mut rerun)
                .with_context(|| format!("rerun of init after a kill at {delay_ms} ms"))?;
            let printed = token_of(&out).context("the rerun printed no token")?;
            let shown = run(coord(&state).args(["token", "show"]))?;
            ensure!(
                token_of(&shown).as_deref() == Some(printed.as_str()),
                "after a kill at {delay_ms} ms `token show` printed {shown}, init printed {printed}"
            );
        }
    }
    Ok(())
}

#[test]
fn init_force_moves_the_old_cluster_aside() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let first = token_of(&run(coord(&state).arg("init"))?).context("no token")?;
    let again = coord(&state).arg("init").output()?;
    ensure!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"),
        "a second init did not refuse, naming --force"
    );
    let out = run(coord(&state).args(["init", "--force"]))?;
    let aside = out
        .lines()
        .find_map(|l| l.strip_prefix("Moved the earlier state aside to "))
        .context(format!(
            "init --force did not say where the old state went: {out}"
        ))?;
    let second = token_of(&out).context("no token")?;
    ensure!(first != second, "init --force kept the old token");
    // The old cluster is whole where it was moved: pointing the CLI at it shows its token.
    let old = run(coord(Path::new(aside)).args(["token", "show"]))?;
    ensure!(
        token_of(&old).as_deref() == Some(first.as_str()),
        "the moved-aside state does not hold the old cluster: {old}"
    );
    let now = run(coord(&state).args(["token", "show"]))?;
    ensure!(token_of(&now).as_deref() == Some(second.as_str()));
    Ok(())
}
