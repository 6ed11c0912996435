//! A job whose questions come from an OpenAI-compatible endpoint of a worker that has two, each
//! serving another model and wanting its own API key: generation must use the endpoint that
//! serves the requested model, with that endpoint's key (it once took the first endpoint and the
//! process-wide key). Processes on loopback; the endpoints are stand-ins speaking the OpenAI API.

use anyhow::{ensure, Result};
use ragd_tests::jobs::with_openai_worker;
use ragd_tests::standin::openai::{Flavour, OpenAiStandin};
use ragd_tests::standin::StandinConfig;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_uses_the_endpoint_that_serves_the_model_with_its_own_key() -> Result<()> {
    let standin = |model: &str, key: &str| {
        OpenAiStandin::start(
            StandinConfig {
                models: vec![model.into()],
                latency: Duration::from_millis(5),
                ..Default::default()
            },
            Flavour::Full,
            Some(key.into()),
        )
    };
    let first = standin("alpha-llm", "key-of-first").await?;
    let second = standin("beta-llm", "key-of-second").await?;
    let urls = (
        format!("http://{}", first.addr),
        format!("http://{}", second.addr),
    );
    tokio::task::spawn_blocking(move || scenario(urls)).await??;
    let chats = |s: &OpenAiStandin| s.state.seen.requests().len();
    eprintln!(
        "chat requests: first endpoint {}, second endpoint {}",
        chats(&first),
        chats(&second)
    );
    ensure!(
        chats(&first) == 0,
        "the endpoint that does not serve beta-llm was asked to generate"
    );
    let asked: Vec<String> = second
        .state
        .seen
        .requests()
        .iter()
        .map(|r| r["model"].as_str().unwrap_or_default().to_string())
        .collect();
    ensure!(
        !asked.is_empty() && asked.iter().all(|m| m == "beta-llm"),
        "the second endpoint was asked {asked:?}"
    );
    Ok(())
}

fn scenario((first, second): (String, String)) -> Result<()> {
    let toml = format!(
        "[[llm.openai_endpoints]]\nname = \"first\"\nurl = \"{first}\"\napi_key_env = \"RAGD_TEST_FIRST_KEY\"\n\n\
         [[llm.openai_endpoints]]\nname = \"second\"\nurl = \"{second}\"\napi_key_env = \"RAGD_TEST_SECOND_KEY\"\n"
    );
    let env = [
        ("RAGD_TEST_FIRST_KEY", "key-of-first"),
        ("RAGD_TEST_SECOND_KEY", "key-of-second"),
        // The process-wide key must not be what is sent.
        ("OPENAI_API_KEY", "process-wide-key"),
    ];
    let (jobs, _worker) = with_openai_worker(&toml, &env, 2)?;
    let id = jobs.submit(&["--llm", "openai:beta-llm", "--epochs", "2"])?;
    let v = jobs.wait_finished(&id, "the job to finish", Duration::from_secs(180))?;
    let logs = jobs.logs(&id)?;
    ensure!(v["state"] == "succeeded", "{v}\n{logs}");
    ensure!(
        logs.contains("with openai:beta-llm"),
        "generation did not run on the OpenAI endpoint:\n{logs}"
    );

    // LLM + ICT in one job: the LLM writes for the 3 chunks of its budget (one shard each, as
    // `submit` above sets --shard-size 1), ICT covers every other chunk.
    let id = jobs.submit(&[
        "--llm",
        "openai:beta-llm+ict",
        "--llm-budget",
        "3",
        "--epochs",
        "2",
    ])?;
    let v = jobs.wait_finished(&id, "the LLM + ICT job to finish", Duration::from_secs(180))?;
    let logs = jobs.logs(&id)?;
    ensure!(v["state"] == "succeeded", "{v}\n{logs}");
    ensure!(
        logs.lines()
            .any(|l| l.ends_with("generate: 3 chunks in 3 shards with openai:beta-llm")),
        "the LLM got exactly its budget of chunks:\n{logs}"
    );
    ensure!(
        logs.contains("openai:beta-llm wrote questions for 3 chunks within its budget (3); ICT covers the other"),
        "ICT covers the rest:\n{logs}"
    );
    let err = jobs
        .submit(&["--llm", "openai:beta-llm", "--llm-budget", "3"])
        .unwrap_err()
        .to_string();
    ensure!(err.contains("X+ict only"), "{err}");
    Ok(())
}
