//! `ragd-worker models pull` against a Hugging Face hub stand-in on 127.0.0.1 (`HF_ENDPOINT`):
//! a GGUF is downloaded into the cache under `HF_HOME`, checked, found again offline, resolved
//! as `--gguf REPO:FILE`; a corrupted transfer and a missing file are refused with messages, and
//! nothing corrupt is left in the cache.
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;

use ragd_engine::data::llm::builtin::arch::Architecture;
use ragd_engine::data::llm::builtin::tiny_gguf::write_tiny_gguf;
use ragd_engine::data::llm::builtin::BuiltinBackend;
use ragd_tests::cluster::binary;
use ragd_tests::standin::hf_hub::HubStandin;

/// Runs `ragd-worker models pull SPEC` against the stand-in (without blocking the runtime that
/// serves it).
async fn pull(hf_home: &Path, endpoint: &str, spec: &str, offline: bool) -> Output {
    let mut cmd = tokio::process::Command::new(binary("ragd-worker"));
    cmd.args(["models", "pull", spec])
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_HUB_OFFLINE");
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd.output().await.unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_checks_caches_and_refuses_corrupt_files() {
    let hub = HubStandin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(Architecture::Qwen2, &gguf, 5).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();
    hub.add_file("acme/tiny-GGUF", "tiny-qwen2.Q8_0.gguf", bytes.clone());
    hub.add_file(
        "acme/tiny-GGUF",
        "garbage.gguf",
        b"not a model at all".to_vec(),
    );
    let home = dir.path().join("hf");
    let url = hub.url();

    // A corrupted transfer is refused and leaves nothing behind.
    hub.state.corrupt.store(true, Ordering::SeqCst);
    let out = pull(&home, &url, "acme/tiny-GGUF:tiny-qwen2.Q8_0.gguf", false).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("corrupt") && text(&out).contains("SHA-256"),
        "{}",
        text(&out)
    );
    let snapshot = home
        .join("hub/models--acme--tiny-GGUF/snapshots")
        .join("0123456789abcdef0123456789abcdef01234567/tiny-qwen2.Q8_0.gguf");
    assert!(
        !snapshot.exists(),
        "a corrupt file was left at {snapshot:?}"
    );

    // A good transfer: the path printed is the cached file, byte for byte, and it loads.
    hub.state.corrupt.store(false, Ordering::SeqCst);
    let out = pull(&home, &url, "acme/tiny-GGUF:tiny-qwen2.Q8_0.gguf", false).await;
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(std::fs::read(&printed).unwrap(), bytes);
    assert!(text(&out).contains("--gguf acme/tiny-GGUF:tiny-qwen2.Q8_0.gguf"));
    let requests = hub.state.content_requests.load(Ordering::SeqCst);

    // Offline, the cached copy is found without a request; --gguf REPO:FILE resolves to it.
    let out = pull(&home, &url, "acme/tiny-GGUF:tiny-qwen2.Q8_0.gguf", true).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), printed);
    assert_eq!(hub.state.content_requests.load(Ordering::SeqCst), requests);
    let access = ragd_engine::models::HubAccess {
        cache: hf_hub::Cache::new(home.join("hub")),
        endpoint: None,
        offline: true,
    };
    let resolved =
        ragd_engine::models::resolve_gguf("acme/tiny-GGUF:tiny-qwen2.Q8_0.gguf", &access).unwrap();
    assert_eq!(resolved, Path::new(&printed));
    tokio::task::spawn_blocking(move || BuiltinBackend::load(&resolved))
        .await
        .unwrap()
        .unwrap();

    // A file that is not a GGUF, a missing file and a missing repository: clear refusals.
    let out = pull(&home, &url, "acme/tiny-GGUF:garbage.gguf", false).await;
    assert!(
        !out.status.success() && text(&out).contains("not a GGUF file"),
        "{}",
        text(&out)
    );
    let out = pull(&home, &url, "acme/tiny-GGUF:absent.gguf", false).await;
    assert!(
        !out.status.success()
            && text(&out).contains("downloading absent.gguf from acme/tiny-GGUF failed"),
        "{}",
        text(&out)
    );
    let out = pull(&home, &url, "no/such-repo:x.gguf", false).await;
    assert!(!out.status.success(), "{}", text(&out));
    // Offline with nothing cached: says so.
    let out = pull(&home, &url, "qwen3-0.6b", true).await;
    assert!(
        !out.status.success() && text(&out).contains("HF_HUB_OFFLINE"),
        "{}",
        text(&out)
    );

    // The catalogue lists every model and which are cached.
    let out = Command::new(binary("ragd-worker"))
        .args(["models", "list"])
        .env("HF_HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for name in [
        "smollm2-135m",
        "qwen2.5-0.5b",
        "qwen3-0.6b",
        "gemma3-1b",
        "phi3.5-mini",
    ] {
        assert!(text(&out).contains(name), "{}", text(&out));
    }
}
