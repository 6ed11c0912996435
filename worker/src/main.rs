//! `ragd-worker`: runs on every machine of a ragd cluster.

use anyhow::Context;
use clap::{Parser, Subcommand};
use ragd_worker::cli;
use ragd_worker::config::{CliOverrides, WorkerConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The ragd cluster worker: advertises this machine's capabilities on the LAN and serves its
/// cluster's coordinator. Configuration comes from defaults, then --config FILE, then
/// RAGD_WORKER_* environment variables (nested keys with `__`), then these flags.
#[derive(Debug, Parser)]
#[command(name = "ragd-worker", version, about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "RAGD_WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for this worker's key, certificate and identity (default: the platform data dir).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `ragd_worker=debug` (RUST_LOG also works).
    #[arg(long, global = true, default_value = "info")]
    log: String,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    /// Do not use mDNS (neither advertise nor look for the coordinator).
    #[arg(long, global = true)]
    no_mdns: bool,
    /// mDNS UDP port (5353 on a real network).
    #[arg(long, global = true)]
    mdns_port: Option<u16>,
    /// Report no GPU even when one is present.
    #[arg(long, global = true)]
    force_cpu: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol this machine in a cluster with the token `ragd-coord init` / `token show` printed.
    Join {
        /// The join token.
        token: String,
        /// The coordinator's HOST:PORT (default: find it with mDNS).
        #[arg(long)]
        coordinator: Option<String>,
        /// The id to enrol under (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Leave the current cluster, if any, and enrol again.
        #[arg(long)]
        force: bool,
    },
    /// Serve the coordinator (the daemon).
    Run {
        /// UDP address to listen on (default 0.0.0.0:7701).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Print what this machine can do (CPU, RAM, GPUs, backends, LLM endpoints); no networking
    /// beyond asking local LLM servers for their models.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune a sentence-embedding model on a pairs file (one machine).
    Train(cli::train::TrainArgs),
    /// Evaluate a model (optionally against a baseline) on a BEIR-layout test set; with
    /// `--reranker`, evaluate reranking the model's top candidates.
    Evaluate(cli::options::EvaluateArgs),
    /// Fine-tune a cross-encoder reranker on rows with hard negatives (one machine).
    TrainReranker(cli::rerank::TrainRerankerArgs),
    /// Rank documents (one per line) against a query with a cross-encoder.
    Rerank(cli::rerank::RerankArgs),
    /// Generate a training set (queries, positives, hard negatives) and a test set from documents.
    GenerateData(cli::data::GenerateDataArgs),
    /// List and pull models (GGUF generators, embedders) into the Hugging Face cache.
    Models(cli::models::ModelsArgs),
}

fn main() -> std::process::ExitCode {
    ragd_engine::device::settle_thread_count();
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let opts = Cli::parse();
    ragd_shared::daemon::init_tracing(&opts.log, opts.log_json);
    // The one-machine ML commands need no cluster config; they run their work on blocking threads.
    let command = match opts.command {
        Command::Train(args) => return cli::train::run_train(args),
        Command::Evaluate(args) => return cli::train::run_evaluate(args),
        Command::TrainReranker(args) => return cli::rerank::run_train_reranker(args),
        Command::Rerank(args) => return cli::rerank::run_rerank(args),
        Command::Models(args) => return cli::models::run_models(args),
        other => other,
    };
    let mut overrides = CliOverrides {
        state_dir: opts.state_dir.clone(),
        no_mdns: opts.no_mdns,
        mdns_port: opts.mdns_port,
        force_cpu: opts.force_cpu,
        ..Default::default()
    };
    match &command {
        Command::Join {
            coordinator, name, ..
        } => {
            overrides.coordinator = coordinator.clone();
            overrides.name = name.clone();
        }
        Command::Run { listen } => overrides.listen = *listen,
        Command::Info { .. }
        | Command::Train(_)
        | Command::Evaluate(_)
        | Command::TrainReranker(_)
        | Command::Rerank(_)
        | Command::Models(_)
        | Command::GenerateData(_) => {}
    }
    let cfg = WorkerConfig::load(opts.config.as_deref(), overrides)?;
    let runtime = ragd_engine::alloc::runtime().context("starting the async runtime")?;
    runtime.block_on(run(command, cfg))
}

async fn run(command: Command, cfg: WorkerConfig) -> anyhow::Result<()> {
    match command {
        Command::Join { token, force, .. } => {
            let ident = ragd_worker::enrolment::join(&cfg, &token, force).await?;
            println!(
                "Joined the cluster as worker {:?} (coordinator {:?}). Start serving with `ragd-worker run`.",
                ident.file.id, ident.file.coordinator_id
            );
        }
        Command::Run { .. } => {
            let cancel = CancellationToken::new();
            let signal = cancel.clone();
            tokio::spawn(async move {
                ragd_shared::daemon::shutdown_signal().await;
                signal.cancel();
            });
            ragd_worker::server::run(cfg, cancel).await?;
        }
        Command::Info { json } => {
            let caps = ragd_worker::capabilities::detect(&cfg.capabilities, &cfg.llm).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&caps)?);
            } else {
                print!("{}", ragd_worker::capabilities::render_text(&caps));
            }
        }
        Command::GenerateData(args) => cli::data::run_generate_data(args).await?,
        Command::Train(_)
        | Command::Evaluate(_)
        | Command::TrainReranker(_)
        | Command::Rerank(_)
        | Command::Models(_) => {
            unreachable!("handled before the runtime starts")
        }
    }
    Ok(())
}
